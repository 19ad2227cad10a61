# Finds xsimd as Debian 12 ships it (8.1). Its exported target links a bare `xtl`, but Debian
# has no xtl package, so linking it would add a failing -lxtl. xsimd needs xtl only for the
# optional XSIMD_ENABLE_XTL_COMPLEX support, which longheads never enables: when no real xtl
# target exists, provide an empty one so the name resolves to a target, not a library file.
find_package(xsimd REQUIRED)
if(NOT TARGET xtl)
  find_package(xtl QUIET)
endif()
if(NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()
