// Launches of the AOT kernels through the lazily opened CUDA driver (see dsLauncher.h).
#include "cudaDriver.h"
#include "dsLauncher.h"
#include "dsmoe_plugin_spec.h"

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace dsmoe
{

int32_t currentDeviceCC(std::string& err) noexcept
{
    Driver const* d = driver(err);
    if (d == nullptr)
    {
        return -1;
    }
    CUdevice dev{};
    CUresult r = d->ctxGetDevice(&dev);
    int major = 0, minor = 0;
    if (r == CUDA_SUCCESS)
    {
        r = d->deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
    }
    if (r == CUDA_SUCCESS)
    {
        r = d->deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
    }
    if (r != CUDA_SUCCESS)
    {
        err = driverError(d, "querying the current device", r);
        return -1;
    }
    return major * 10 + minor;
}

namespace
{
//! The kernel's function in the current context: its module loaded once per context and kept.
CUfunction function(Driver const* d, KernelSpec const& k, std::string& err)
{
    static std::mutex mutex;
    static std::map<std::pair<CUcontext, KernelSpec const*>, CUfunction> cache;
    CUcontext ctx{};
    CUresult r = d->ctxGetCurrent(&ctx);
    if (r != CUDA_SUCCESS || ctx == nullptr)
    {
        err = r != CUDA_SUCCESS ? driverError(d, "cuCtxGetCurrent", r) : "no current CUDA context";
        return nullptr;
    }
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find({ctx, &k});
    if (it != cache.end())
    {
        return it->second;
    }
    CUmodule module{};
    CUfunction fn{};
    r = d->moduleLoadData(&module, k.image);
    if (r == CUDA_SUCCESS)
    {
        r = d->moduleGetFunction(&fn, module, k.entry);
    }
    if (r == CUDA_SUCCESS && k.sharedBytes > 49152)
    {
        r = d->funcSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k.sharedBytes);
    }
    if (r != CUDA_SUCCESS)
    {
        err = driverError(d, (std::string("loading ") + k.id).c_str(), r);
        return nullptr;
    }
    cache[{ctx, &k}] = fn;
    return fn;
}
} // namespace

int32_t launchPlan(Plan const& plan, void const* const* inputs, int32_t nbInputs, void* const* outputs,
    int32_t nbOutputs, void* workspace, void* stream, std::string& err) noexcept
{
    Driver const* d = driver(err);
    if (d == nullptr || plan.config == nullptr)
    {
        if (plan.config == nullptr)
        {
            err = "no launch plan";
        }
        return 1;
    }
    auto* ws = static_cast<unsigned char*>(workspace);
    auto const cuStream = static_cast<CUstream>(stream);
    // 1. zero the buffers marked zeroed (counts; route's no-bias zeros)
    for (int32_t b = 0; b < plan.nbBuffers; ++b)
    {
        if (plan.config->buffers[b].zeroed && plan.bytes[b] > 0)
        {
            auto ptr = reinterpret_cast<CUdeviceptr>(ws + plan.offset[b]);
            CUresult r = d->memsetD8Async(ptr, 0, plan.bytes[b], cuStream);
            if (r != CUDA_SUCCESS)
            {
                err = driverError(d, "cuMemsetD8Async", r);
                return 1;
            }
        }
    }
    // 2. the launches, in order, with arguments bound as the kernel table says
    for (int32_t l = 0; l < plan.nbLaunches; ++l)
    {
        KernelSpec const& k = *plan.kernels[l];
        if (plan.grid[l][0] == 0 || plan.grid[l][1] == 0 || plan.grid[l][2] == 0)
        {
            continue; // nothing to do (as Launch.run skips an empty grid)
        }
        CUfunction fn = function(d, k, err);
        if (fn == nullptr)
        {
            return 1;
        }
        CUdeviceptr ptrs[32]{};
        int32_t ints[32]{};
        float floats[32]{};
        void* params[32]{};
        if (k.nbArgs > 32)
        {
            err = std::string(k.kernel) + ": too many arguments";
            return 1;
        }
        for (int32_t a = 0; a < k.nbArgs; ++a)
        {
            ArgSpec const& arg = k.args[a];
            switch (arg.kind)
            {
            case ArgKind::kInput:
                ptrs[a] = arg.index < nbInputs ? reinterpret_cast<CUdeviceptr>(inputs[arg.index]) : 0;
                break;
            case ArgKind::kOutput:
                ptrs[a] = arg.index < nbOutputs ? reinterpret_cast<CUdeviceptr>(outputs[arg.index]) : 0;
                break;
            case ArgKind::kWorkspace: ptrs[a] = reinterpret_cast<CUdeviceptr>(ws + plan.offset[arg.index]); break;
            case ArgKind::kInputOrWorkspace:
                ptrs[a] = arg.index < nbInputs && inputs[arg.index] != nullptr
                    ? reinterpret_cast<CUdeviceptr>(inputs[arg.index])
                    : reinterpret_cast<CUdeviceptr>(ws + plan.offset[arg.fallback]);
                break;
            case ArgKind::kScalarI32: ints[a] = static_cast<int32_t>(plan.scalars[arg.index].i); break;
            case ArgKind::kScalarF32: floats[a] = plan.scalars[arg.index].f; break;
            case ArgKind::kNull: ptrs[a] = 0; break;
            }
            bool const pointer = arg.kind != ArgKind::kScalarI32 && arg.kind != ArgKind::kScalarF32;
            if (pointer && arg.kind != ArgKind::kNull && (ptrs[a] == 0 || ptrs[a] % kAlign != 0))
            {
                err = std::string(k.kernel) + ": argument " + arg.name + " is null or not " + std::to_string(kAlign)
                    + "-byte aligned (the AOT kernels assume it)";
                return 1;
            }
            params[a] = arg.kind == ArgKind::kScalarI32 ? static_cast<void*>(&ints[a])
                : arg.kind == ArgKind::kScalarF32        ? static_cast<void*>(&floats[a])
                                                         : static_cast<void*>(&ptrs[a]);
        }
        CUresult r = d->launchKernel(fn, static_cast<unsigned>(plan.grid[l][0]), static_cast<unsigned>(plan.grid[l][1]),
            static_cast<unsigned>(plan.grid[l][2]), static_cast<unsigned>(k.threads), 1, 1,
            static_cast<unsigned>(k.sharedBytes), cuStream, params, nullptr);
        if (r != CUDA_SUCCESS)
        {
            err = driverError(d, (std::string("launching ") + k.id).c_str(), r);
            return 1;
        }
    }
    return 0;
}

} // namespace dsmoe
