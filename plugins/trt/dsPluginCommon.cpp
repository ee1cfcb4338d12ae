// Logging and the IPluginV3 glue shared by the dsmoe plugins (see dsPluginCommon.h); Fields: dsPluginFields.cpp.
#include "dsPluginCommon.h"

#include <cstdio>
#include <mutex>

namespace dsmoe
{
namespace
{
std::mutex gLogMutex;
nvinfer1::ILoggerFinder* gFinder = nullptr;
thread_local std::string gLastError;

void log(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept
{
    try
    {
        if (severity <= nvinfer1::ILogger::Severity::kERROR)
        {
            gLastError = msg;
        }
        nvinfer1::ILogger* logger = nullptr;
        {
            std::lock_guard<std::mutex> lock(gLogMutex);
            logger = gFinder != nullptr ? gFinder->findLogger() : nullptr;
        }
        if (logger != nullptr)
        {
            logger->log(severity, msg.c_str());
        }
        else
        {
            std::fprintf(stderr, "dsmoe TensorRT plugins: %s\n", msg.c_str());
        }
    }
    catch (...)
    {
    }
}

} // namespace

void logError(std::string const& msg) noexcept
{
    log(nvinfer1::ILogger::Severity::kERROR, msg);
}

void logWarning(std::string const& msg) noexcept
{
    log(nvinfer1::ILogger::Severity::kWARNING, msg);
}

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    std::lock_guard<std::mutex> lock(gLogMutex);
    gFinder = finder;
}

char const* lastError() noexcept
{
    return gLastError.c_str();
}

bool toDType(nvinfer1::DataType t, DType& out) noexcept
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT: out = DType::kFP32; return true;
    case nvinfer1::DataType::kHALF: out = DType::kFP16; return true;
    case nvinfer1::DataType::kBF16: out = DType::kBF16; return true;
    default: return false;
    }
}

// ---- DsPluginBase ------------------------------------------------------------------------------

nvinfer1::IPluginCapability* DsPluginBase::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* DsPluginBase::attachToContext(nvinfer1::IPluginResourceContext* context) noexcept
{
    (void) context; // no per-context resources: the kernels' modules are cached per CUDA context
    return clone();
}

int32_t DsPluginBase::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    (void) inputDesc;
    (void) outputDesc; // the shapes are those of the last onShapeChange()
    std::string err;
    // 1. the device's architecture -> the built kernels that run on it
    int32_t const cc = currentDeviceCC(err);
    int32_t const arch = cc < 0 ? -1 : kernelArch(cc);
    if (cc >= 0 && arch < 0)
    {
        err = "no kernels in this library run on sm_" + std::to_string(cc)
            + " (rebuild it: dsmoe build-plugins --arch sm_" + std::to_string(cc) + ")";
    }
    // 2. the plan (configuration, grids, workspace) for the current shapes, 3. the launches
    Plan p;
    if (arch < 0 || !plan(arch, p, err)
        || launchPlan(p, inputs, mNbInputs, outputs, getNbOutputs(), workspace, stream, err) != 0)
    {
        logError(std::string(getPluginName()) + " (" + mLayer + ") enqueue: " + err);
        return 1;
    }
    return 0;
}

} // namespace dsmoe

// ---- for the test harness: the plan a plugin would launch on an architecture ---------------------
extern "C" __attribute__((visibility("default"))) int32_t dsmoe_trt_describe_plan(
    nvinfer1::IPluginV3* plugin, int32_t arch, char* buf, int32_t len) noexcept
{
    std::string text;
    auto* p = dynamic_cast<dsmoe::DsPluginBase*>(plugin);
    dsmoe::Plan plan;
    std::string err;
    if (p == nullptr)
    {
        text = "not a dsmoe plugin";
    }
    else if (!p->plan(arch, plan, err))
    {
        text = err;
    }
    else
    {
        text = dsmoe::describePlan(plan);
    }
    if (buf != nullptr && len > 0)
    {
        std::snprintf(buf, static_cast<std::size_t>(len), "%s", text.c_str());
    }
    return (p != nullptr && err.empty()) ? static_cast<int32_t>(text.size()) : -1;
}

extern "C" __attribute__((visibility("default"))) char const* dsmoe_trt_last_error() noexcept
{
    return dsmoe::lastError();
}
