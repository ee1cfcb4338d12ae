// Launch plans of the ahead-of-time compiled Triton kernels (the table of dsmoe_kernels.cpp) and
// their launch through the CUDA driver API, resolved lazily (cudaDriver.cpp): nothing here needs
// a GPU, a driver or libnvinfer until launchPlan() runs.
//
// A plan is what the PyTorch launchers compute for the same sizes (plugins/route/launch.py,
// plugins/moe/launch.py): the configuration whose rule holds for (T, H, E, K, I) on the
// architecture and dtype, each launch's grid, the workspace buffers' offsets, the scalar arguments.
#pragma once

#include "dsPluginTypes.h"

#include <cstddef>
#include <cstdint>
#include <string>

namespace dsmoe
{

constexpr int32_t kMaxLaunches = 8;
constexpr int32_t kMaxBuffers = 12;
constexpr int32_t kMaxScalars = 16;

struct ScalarValue
{
    int64_t i;
    float f;
};

struct Plan
{
    ConfigSpec const* config{nullptr};
    DType dtype{DType::kFP32};
    Sizes sizes{};
    int32_t nbLaunches{0};
    KernelSpec const* kernels[kMaxLaunches]{};
    int64_t grid[kMaxLaunches][3]{};
    int32_t nbBuffers{0};
    std::size_t offset[kMaxBuffers]{};
    std::size_t bytes[kMaxBuffers]{};
    std::size_t workspace{0};
    int32_t nbScalars{0};
    ScalarValue scalars[kMaxScalars]{};
};

//! The plan for ``op`` on ``arch`` with inputs of ``dtype``; ``scalars`` are the plugin's scalar
//! slots (sizes and attribute codes), the configuration's derived slots (P, MB) are filled in.
bool makePlan(Op op, int32_t arch, DType dtype, Sizes const& sizes, ScalarValue const* scalars, int32_t nbScalars,
    Plan& plan, std::string& err) noexcept;

//! Workspace bytes enough for ``sizes`` and every smaller T: the largest over all configurations
//! of ``op`` and ``dtype`` on every built architecture (the choice depends on T and the device).
std::size_t workspaceBound(Op op, DType dtype, Sizes const& sizes) noexcept;

//! The built architecture whose cubins run on a device of compute capability ``cc`` (major*10 +
//! minor): the same one, or an older minor of the same major (not sm_90a's wgmma kernels); -1: none.
int32_t kernelArch(int32_t cc) noexcept;

//! The compute capability of the current CUDA context's device, or -1 (and why in ``err``).
int32_t currentDeviceCC(std::string& err) noexcept;

//! 1. zero the buffers marked zeroed, 2. launch each kernel of the plan on ``stream``.
int32_t launchPlan(Plan const& plan, void const* const* inputs, int32_t nbInputs, void* const* outputs,
    int32_t nbOutputs, void* workspace, void* stream, std::string& err) noexcept;

//! The plan as JSON (configuration, launches with grid/block/shared bytes/constexprs, buffers).
std::string describePlan(Plan const& plan);

} // namespace dsmoe
