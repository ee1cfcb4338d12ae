// Lazy CUDA driver: dlopen + dlsym at first use, never linked (see cudaDriver.h).
#include "cudaDriver.h"

#include <dlfcn.h>
#include <mutex>

namespace dsmoe
{
namespace
{
Driver gDriver{};
std::string gError;
std::once_flag gOnce;

template <typename F>
bool resolve(void* lib, char const* name, F& fn)
{
    fn = reinterpret_cast<F>(dlsym(lib, name));
    if (fn == nullptr)
    {
        gError = std::string("libcuda.so.1 has no ") + name + " (a CUDA driver older than the kernels need)";
        return false;
    }
    return true;
}

void load()
{
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        char const* why = dlerror();
        gError = std::string("no CUDA driver: cannot load libcuda.so.1 (") + (why ? why : "unknown") + ")";
        return;
    }
    Driver d{};
    bool ok = resolve(lib, "cuInit", d.init) && resolve(lib, "cuCtxGetCurrent", d.ctxGetCurrent)
        && resolve(lib, "cuCtxGetDevice", d.ctxGetDevice) && resolve(lib, "cuDeviceGetAttribute", d.deviceGetAttribute)
        && resolve(lib, "cuModuleLoadData", d.moduleLoadData)
        && resolve(lib, "cuModuleGetFunction", d.moduleGetFunction)
        && resolve(lib, "cuFuncSetAttribute", d.funcSetAttribute) && resolve(lib, "cuLaunchKernel", d.launchKernel)
        && resolve(lib, "cuMemsetD8Async", d.memsetD8Async) && resolve(lib, "cuGetErrorString", d.getErrorString);
    if (!ok)
    {
        return;
    }
    CUresult r = d.init(0);
    if (r != CUDA_SUCCESS)
    {
        gError = driverError(&d, "cuInit", r);
        return;
    }
    gDriver = d;
}
} // namespace

Driver const* driver(std::string& err) noexcept
{
    try
    {
        std::call_once(gOnce, load);
    }
    catch (...)
    {
        err = "loading the CUDA driver failed";
        return nullptr;
    }
    if (gDriver.launchKernel == nullptr)
    {
        err = gError;
        return nullptr;
    }
    return &gDriver;
}

std::string driverError(Driver const* d, char const* what, CUresult r)
{
    char const* text = nullptr;
    if (d != nullptr && d->getErrorString != nullptr)
    {
        d->getErrorString(r, &text);
    }
    return std::string(what) + " failed: CUresult " + std::to_string(static_cast<int>(r)) + " ("
        + (text ? text : "unknown") + ")";
}

} // namespace dsmoe
