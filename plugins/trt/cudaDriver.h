// The CUDA driver API, resolved at first use with dlopen("libcuda.so.1") + dlsym: the plugin
// library links neither libcuda nor cudart, so it loads (and every build-phase method runs) on a
// machine without a GPU driver. Only enqueue() needs the driver.
#pragma once

#include <cuda.h>

#include <string>

namespace dsmoe
{

struct Driver
{
    decltype(&::cuInit) init;
    decltype(&::cuCtxGetCurrent) ctxGetCurrent;
    decltype(&::cuCtxGetDevice) ctxGetDevice;
    decltype(&::cuDeviceGetAttribute) deviceGetAttribute;
    decltype(&::cuModuleLoadData) moduleLoadData;
    decltype(&::cuModuleGetFunction) moduleGetFunction;
    decltype(&::cuFuncSetAttribute) funcSetAttribute;
    decltype(&::cuLaunchKernel) launchKernel;
    decltype(&::cuMemsetD8Async) memsetD8Async;
    decltype(&::cuGetErrorString) getErrorString;
};

//! The driver's entry points, loaded once; nullptr (and why in ``err``) when there is no driver.
Driver const* driver(std::string& err) noexcept;

//! "cuLaunchKernel failed: CUDA_ERROR_... (the driver's text)".
std::string driverError(Driver const* d, char const* what, CUresult r);

} // namespace dsmoe
