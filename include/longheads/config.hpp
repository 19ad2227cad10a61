// SPDX-License-Identifier: MIT
// Version macros and the invariant-assertion hook.
//
// LONGHEADS_ASSERT guards internal invariants only (never user input, which is validated and
// reported by exceptions, see errors.hpp). It is active unless NDEBUG is defined and can be
// overridden by defining it before the first include, like eigen_assert. Define it for the
// whole program, never per file: a header-only library inlined two ways is an ODR violation.
#pragma once

#define LONGHEADS_VERSION_MAJOR 0
#define LONGHEADS_VERSION_MINOR 1
#define LONGHEADS_VERSION_PATCH 0

#ifndef LONGHEADS_ASSERT
#  ifdef NDEBUG
#    define LONGHEADS_ASSERT(cond, msg) ((void)0)
#  else
#    include <cstdio>
#    include <cstdlib>
#    define LONGHEADS_ASSERT(cond, msg)                                                       \
       ((cond) ? (void)0                                                                     \
               : (std::fprintf(stderr, "longheads: assertion failed: %s (%s) at %s:%d\n",    \
                               #cond, msg, __FILE__, __LINE__),                              \
                  std::abort()))
#  endif
#endif
