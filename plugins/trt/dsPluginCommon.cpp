// Fields, logging and the IPluginV3 glue shared by the dsmoe plugins (see dsPluginCommon.h).
#include "dsPluginCommon.h"

#include <cmath>
#include <cstdio>
#include <cstring>
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

std::string typeName(nvinfer1::PluginFieldType t)
{
    switch (t)
    {
    case nvinfer1::PluginFieldType::kINT32: return "INT32";
    case nvinfer1::PluginFieldType::kINT64: return "INT64";
    case nvinfer1::PluginFieldType::kFLOAT32: return "FLOAT32";
    case nvinfer1::PluginFieldType::kFLOAT64: return "FLOAT64";
    case nvinfer1::PluginFieldType::kCHAR: return "CHAR";
    default: return "type " + std::to_string(static_cast<int32_t>(t));
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

// ---- Fields ------------------------------------------------------------------------------------

Fields::Fields(Fields const& other)
    : mSpecs(other.mSpecs)
    , mNbSpecs(other.mNbSpecs)
    , mInts(other.mInts)
    , mFloats(other.mFloats)
    , mStrings(other.mStrings)
{
}

Fields& Fields::operator=(Fields const& other)
{
    if (this != &other)
    {
        mSpecs = other.mSpecs;
        mNbSpecs = other.mNbSpecs;
        mInts = other.mInts;
        mFloats = other.mFloats;
        mStrings = other.mStrings;
        mIntStore.clear();
        mFieldStore.clear();
    }
    return *this;
}

bool Fields::parse(char const* plugin, FieldSpec const* specs, int32_t nbSpecs,
    nvinfer1::PluginFieldCollection const* fc, std::string& err)
{
    (void) plugin;
    mSpecs = specs;
    mNbSpecs = nbSpecs;
    mInts.assign(nbSpecs, 0);
    mFloats.assign(nbSpecs, 0.F);
    mStrings.assign(nbSpecs, std::string());
    std::vector<bool> seen(nbSpecs, false);
    int32_t const n = fc == nullptr ? 0 : fc->nbFields;
    if (n < 0 || (n > 0 && fc->fields == nullptr))
    {
        err = "malformed PluginFieldCollection";
        return false;
    }
    // 1. every given field: a known name, once, of its type
    for (int32_t j = 0; j < n; ++j)
    {
        nvinfer1::PluginField const& f = fc->fields[j];
        if (f.name == nullptr)
        {
            err = "a field without a name";
            return false;
        }
        int32_t i = 0;
        while (i < nbSpecs && std::strcmp(specs[i].name, f.name) != 0)
        {
            ++i;
        }
        if (i == nbSpecs)
        {
            err = std::string("unknown field '") + f.name + "'";
            return false;
        }
        if (seen[i])
        {
            err = std::string("field '") + f.name + "' given twice";
            return false;
        }
        seen[i] = true;
        FieldSpec const& s = specs[i];
        std::string const what = std::string("field '") + f.name + "'";
        if (f.data == nullptr && !(s.kind == FieldKind::kString && f.length == 0))
        {
            err = what + " has no data";
            return false;
        }
        if (s.kind == FieldKind::kInt)
        {
            if (f.length != 1 || (f.type != nvinfer1::PluginFieldType::kINT32 && f.type != nvinfer1::PluginFieldType::kINT64))
            {
                err = what + " must be one INT32 (an ONNX INT attribute), got " + std::to_string(f.length) + " x "
                    + typeName(f.type);
                return false;
            }
            mInts[i] = f.type == nvinfer1::PluginFieldType::kINT32 ? *static_cast<int32_t const*>(f.data)
                                                                    : *static_cast<int64_t const*>(f.data);
        }
        else if (s.kind == FieldKind::kFloat)
        {
            if (f.length != 1
                || (f.type != nvinfer1::PluginFieldType::kFLOAT32 && f.type != nvinfer1::PluginFieldType::kFLOAT64))
            {
                err = what + " must be one FLOAT32 (an ONNX FLOAT attribute), got " + std::to_string(f.length) + " x "
                    + typeName(f.type);
                return false;
            }
            mFloats[i] = f.type == nvinfer1::PluginFieldType::kFLOAT32
                ? *static_cast<float const*>(f.data)
                : static_cast<float>(*static_cast<double const*>(f.data));
        }
        else
        {
            if (f.type != nvinfer1::PluginFieldType::kCHAR || f.length < 0)
            {
                err = what + " must be CHAR (an ONNX STRING attribute), got " + typeName(f.type);
                return false;
            }
            // at most `length` bytes; the parser counts the terminating NUL in the length
            auto const* p = static_cast<char const*>(f.data);
            std::size_t len = 0;
            while (len < static_cast<std::size_t>(f.length) && p[len] != '\0')
            {
                ++len;
            }
            mStrings[i].assign(p, len);
        }
    }
    // 2. defaults for the absent ones; required ones must be there
    for (int32_t i = 0; i < nbSpecs; ++i)
    {
        FieldSpec const& s = specs[i];
        if (seen[i])
        {
            continue;
        }
        if (s.required)
        {
            err = std::string("missing required field '") + s.name + "'";
            return false;
        }
        mInts[i] = s.defInt;
        mFloats[i] = s.defFloat;
        mStrings[i] = s.defString != nullptr ? s.defString : "";
    }
    // 3. ranges, finite floats, choices
    for (int32_t i = 0; i < nbSpecs; ++i)
    {
        FieldSpec const& s = specs[i];
        if (s.kind == FieldKind::kInt && (mInts[i] < s.lo || mInts[i] > s.hi))
        {
            err = std::string("field '") + s.name + "' = " + std::to_string(mInts[i]) + " is outside ["
                + std::to_string(s.lo) + ", " + (s.hi == INT64_MAX ? std::string("inf") : std::to_string(s.hi)) + "]";
            return false;
        }
        if (s.kind == FieldKind::kFloat && !std::isfinite(mFloats[i]))
        {
            err = std::string("field '") + s.name + "' is not a finite number";
            return false;
        }
        if (s.kind == FieldKind::kString && s.nbChoices > 0 && code(i) < 0)
        {
            std::string allowed;
            for (int32_t c = 0; c < s.nbChoices; ++c)
            {
                allowed += (c ? ", " : "") + std::string(s.choices[c]);
            }
            err = std::string("field '") + s.name + "' = '" + mStrings[i] + "' is not one of " + allowed;
            return false;
        }
    }
    return true;
}

int32_t Fields::code(int32_t i) const
{
    FieldSpec const& s = mSpecs[i];
    for (int32_t c = 0; c < s.nbChoices; ++c)
    {
        if (mStrings.at(i) == s.choices[c])
        {
            return c;
        }
    }
    return -1;
}

nvinfer1::PluginFieldCollection const* Fields::serialize()
{
    mIntStore.assign(mNbSpecs, 0);
    mFieldStore.clear();
    for (int32_t i = 0; i < mNbSpecs; ++i)
    {
        FieldSpec const& s = mSpecs[i];
        if (s.kind == FieldKind::kInt)
        {
            mIntStore[i] = static_cast<int32_t>(mInts[i]);
            mFieldStore.emplace_back(s.name, &mIntStore[i], nvinfer1::PluginFieldType::kINT32, 1);
        }
        else if (s.kind == FieldKind::kFloat)
        {
            mFieldStore.emplace_back(s.name, &mFloats[i], nvinfer1::PluginFieldType::kFLOAT32, 1);
        }
        else // the bytes and their NUL, as TensorRT's ONNX parser passes a STRING attribute
        {
            mFieldStore.emplace_back(s.name, mStrings[i].c_str(), nvinfer1::PluginFieldType::kCHAR,
                static_cast<int32_t>(mStrings[i].size() + 1));
        }
    }
    mFc.nbFields = static_cast<int32_t>(mFieldStore.size());
    mFc.fields = mFieldStore.data();
    return &mFc;
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
