// SPDX-License-Identifier: MIT
// Umbrella header: the whole public API of longheads (the naive references live apart, in
// longheads/reference/, because only tests and experiments need them).
#pragma once

#include "attention.hpp"
#include "attention_config.hpp"
#include "attention_kernel.hpp"
#include "chunk_encoder.hpp"
#include "chunk_encoding.hpp"
#include "chunk_scorer.hpp"
#include "chunk_selection.hpp"
#include "config.hpp"
#include "errors.hpp"
#include "executor.hpp"
#include "group_selection.hpp"
#include "head_selector.hpp"
#include "kv_cache.hpp"
#include "kv_storage.hpp"
#include "matmul.hpp"
#include "planner.hpp"
#include "policies.hpp"
#include "rope.hpp"
#include "rope_remapper.hpp"
#include "tile_streamer.hpp"
#include "validation.hpp"
#include "views.hpp"
#include "work_items.hpp"
#include "workspace.hpp"
