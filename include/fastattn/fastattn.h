// fastattn: exact attention kernels for LLM inference. Umbrella header.
#pragma once

#include "fastattn/decode_call.h"
#include "fastattn/decode_plan.h"
#include "fastattn/error.h"
#include "fastattn/ops.h"
#include "fastattn/options.h"
#include "fastattn/tensor.h"
