// A C-ABI shim over a TensorRT plugin library, for tests (plugins/trt/harness.py drives it with
// ctypes): it loads the library the way TensorRT does (dlopen, setLoggerFinder, getCreators) and
// calls each IPluginV3 method with the arguments TensorRT would pass. It implements what TensorRT
// would provide to a plugin: a logger, and an IExprBuilder whose expressions are symbolic
// (a named input dimension such as "T" stays a symbol; constants fold), so output shapes can be
// checked for a dynamic token count. enqueue() is forwarded too (for a machine with a GPU).
#include "NvInferRuntime.h"

#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

#define H_API extern "C" __attribute__((visibility("default")))

namespace
{
class Logger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        last = msg ? msg : "";
        all += "[" + std::to_string(static_cast<int32_t>(severity)) + "] " + last + "\n";
    }
    std::string last, all;
};

class LoggerFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() noexcept override { return &logger; }
    Logger logger;
};

// ---- the symbolic expression builder -------------------------------------------------------------
class ExprImpl : public apiv::VDimensionExpr
{
public:
    bool isConstant() const override { return constant; }
    int64_t getConstantValue() const override { return constant ? value : INT64_MIN; }
    bool isSizeTensor() const override { return false; }
    bool constant{false};
    int64_t value{0};
    std::string text;
};

class Expr : public IDimensionExpr
{
public:
    Expr() { mImpl = &impl; }
    ~Expr() noexcept override = default;
    ExprImpl impl;
};

class BuilderImpl : public apiv::VExprBuilder
{
public:
    Expr const* make(bool isConst, int64_t v, std::string text)
    {
        exprs.push_back(std::make_unique<Expr>());
        Expr* e = exprs.back().get();
        e->impl.constant = isConst;
        e->impl.value = v;
        e->impl.text = isConst ? std::to_string(v) : std::move(text);
        return e;
    }
    IDimensionExpr const* constant(int64_t value) override { return make(true, value, ""); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        static char const* const names[] = {"+", "*", "max", "min", "-", "==", "<", "//", "cdiv"};
        auto const& x = static_cast<Expr const&>(a).impl;
        auto const& y = static_cast<Expr const&>(b).impl;
        int32_t const k = static_cast<int32_t>(op);
        if (k < 0 || k > 8)
        {
            return nullptr;
        }
        if (x.constant && y.constant)
        {
            int64_t const u = x.value, v = y.value;
            int64_t const r[] = {u + v, u * v, u > v ? u : v, u < v ? u : v, u - v, u == v, u < v,
                v ? u / v : 0, v ? (u + v - 1) / v : 0};
            return make(true, r[k], "");
        }
        return make(false, 0, "(" + x.text + " " + names[k] + " " + y.text + ")");
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
    std::vector<std::unique_ptr<Expr>> exprs;
};

class Builder : public IExprBuilder
{
public:
    Builder() { mImpl = &impl; }
    ~Builder() noexcept override = default;
    BuilderImpl impl;
};

struct Library
{
    void* handle{nullptr};
    IPluginCreatorInterface* const* creators{nullptr};
    int32_t nbCreators{0};
    LoggerFinder finder;
    int32_t (*describe)(IPluginV3*, int32_t, char*, int32_t){nullptr};
};

int32_t copyOut(std::string const& s, char* out, int32_t n)
{
    if (out != nullptr && n > 0)
    {
        std::snprintf(out, static_cast<std::size_t>(n), "%s", s.c_str());
    }
    return static_cast<int32_t>(s.size());
}

IPluginV3OneBuild* build(void* p)
{
    return static_cast<IPluginV3OneBuild*>(static_cast<IPluginV3*>(p)->getCapabilityInterface(PluginCapabilityType::kBUILD));
}

IPluginV3OneRuntime* runtime(void* p)
{
    return static_cast<IPluginV3OneRuntime*>(
        static_cast<IPluginV3*>(p)->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}
} // namespace

H_API int32_t h_sizeof(char const* what)
{
    std::string const w = what;
    return w == "PluginField" ? sizeof(PluginField)
        : w == "PluginFieldCollection" ? sizeof(PluginFieldCollection)
        : w == "Dims" ? sizeof(Dims)
        : w == "PluginTensorDesc" ? sizeof(PluginTensorDesc)
        : w == "DynamicPluginTensorDesc" ? sizeof(DynamicPluginTensorDesc)
        : -1;
}

H_API void* h_open(char const* path, char* err, int32_t n)
{
    auto lib = std::make_unique<Library>();
    lib->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib->handle == nullptr)
    {
        char const* e = dlerror();
        copyOut(e ? e : "dlopen failed", err, n);
        return nullptr;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetFinder = void (*)(ILoggerFinder*);
    auto get = reinterpret_cast<GetCreators>(dlsym(lib->handle, "getCreators"));
    auto set = reinterpret_cast<SetFinder>(dlsym(lib->handle, "setLoggerFinder"));
    if (get == nullptr || set == nullptr)
    {
        copyOut("the library exports no getCreators/setLoggerFinder", err, n);
        return nullptr;
    }
    set(&lib->finder);
    lib->creators = get(lib->nbCreators);
    lib->describe = reinterpret_cast<int32_t (*)(IPluginV3*, int32_t, char*, int32_t)>(
        dlsym(lib->handle, "dsmoe_trt_describe_plan"));
    return lib.release();
}

H_API char const* h_last_log(void* lib)
{
    return static_cast<Library*>(lib)->finder.logger.last.c_str();
}

H_API void h_clear_log(void* lib)
{
    static_cast<Library*>(lib)->finder.logger.last.clear();
}

H_API int32_t h_nb_creators(void* lib)
{
    return static_cast<Library*>(lib)->nbCreators;
}

//! "kind|name|version|namespace|field:type:length,field:type:length,..."
H_API int32_t h_creator(void* lib, int32_t i, char* out, int32_t n)
{
    auto* L = static_cast<Library*>(lib);
    IPluginCreatorInterface* c = L->creators[i];
    std::string s = std::string(c->getInterfaceInfo().kind) + "|";
    if (std::strcmp(c->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0)
    {
        auto* v3 = static_cast<IPluginCreatorV3One*>(c);
        s += std::string(v3->getPluginName()) + "|" + v3->getPluginVersion() + "|" + v3->getPluginNamespace() + "|";
        PluginFieldCollection const* fc = v3->getFieldNames();
        for (int32_t f = 0; fc != nullptr && f < fc->nbFields; ++f)
        {
            s += std::string(f ? "," : "") + fc->fields[f].name + ":"
                + std::to_string(static_cast<int32_t>(fc->fields[f].type)) + ":" + std::to_string(fc->fields[f].length);
        }
    }
    return copyOut(s, out, n);
}

//! Look up the creator by name/version/namespace (as the registry would), createPlugin(); the
//! plugin, or null (the library's log says why).
H_API void* h_create(void* lib, char const* name, char const* version, char const* ns, char const* layer,
    PluginFieldCollection const* fc, int32_t phase)
{
    auto* L = static_cast<Library*>(lib);
    for (int32_t i = 0; i < L->nbCreators; ++i)
    {
        IPluginCreatorInterface* c = L->creators[i];
        if (std::strcmp(c->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
        {
            continue;
        }
        auto* v3 = static_cast<IPluginCreatorV3One*>(c);
        if (std::strcmp(v3->getPluginName(), name) == 0 && std::strcmp(v3->getPluginVersion(), version) == 0
            && std::strcmp(v3->getPluginNamespace(), ns) == 0)
        {
            return v3->createPlugin(layer, fc, static_cast<TensorRTPhase>(phase));
        }
    }
    L->finder.logger.last = std::string("no creator ") + ns + "::" + name + " version " + version;
    return nullptr;
}

H_API void h_destroy(void* p)
{
    delete static_cast<IPluginV3*>(p);
}

//! "core kind|build kind|runtime kind|name|version|namespace" (empty where a capability is null)
H_API int32_t h_info(void* p, char* out, int32_t n)
{
    auto* plugin = static_cast<IPluginV3*>(p);
    std::string s;
    for (auto t : {PluginCapabilityType::kCORE, PluginCapabilityType::kBUILD, PluginCapabilityType::kRUNTIME})
    {
        IPluginCapability* c = plugin->getCapabilityInterface(t);
        s += std::string(c ? c->getInterfaceInfo().kind : "") + "|";
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    s += std::string(core->getPluginName()) + "|" + core->getPluginVersion() + "|" + core->getPluginNamespace();
    return copyOut(s, out, n);
}

H_API int32_t h_nb_outputs(void* p)
{
    return build(p)->getNbOutputs();
}

H_API int32_t h_output_types(void* p, int32_t const* in, int32_t nin, int32_t* out, int32_t nout)
{
    return build(p)->getOutputDataTypes(
        reinterpret_cast<DataType*>(out), nout, reinterpret_cast<DataType const*>(in), nin);
}

//! Input dims as tokens (an integer: a constant; else a symbol), ``ranks[i]`` tokens per input;
//! writes the outputs' dims as "d,d;d,d". Returns the plugin's status.
H_API int32_t h_output_shapes(void* p, int32_t nin, int32_t const* ranks, char const* const* tokens, int32_t nout,
    char* out, int32_t n)
{
    Builder b;
    std::vector<DimsExprs> ins(nin), outs(nout);
    int32_t t = 0;
    for (int32_t i = 0; i < nin; ++i)
    {
        ins[i].nbDims = ranks[i];
        for (int32_t j = 0; j < ranks[i]; ++j, ++t)
        {
            char* end = nullptr;
            long long v = std::strtoll(tokens[t], &end, 10);
            bool const isConst = end != tokens[t] && *end == '\0';
            ins[i].d[j] = b.impl.make(isConst, isConst ? v : 0, tokens[t]);
        }
    }
    int32_t status = build(p)->getOutputShapes(ins.data(), nin, nullptr, 0, outs.data(), nout, b);
    std::string s;
    for (int32_t o = 0; status == 0 && o < nout; ++o)
    {
        s += o ? ";" : "";
        for (int32_t j = 0; j < outs[o].nbDims; ++j)
        {
            auto const* e = static_cast<Expr const*>(outs[o].d[j]);
            s += std::string(j ? "," : "") + (e ? e->impl.text : "null");
        }
    }
    copyOut(s, out, n);
    return status;
}

H_API int32_t h_supports(void* p, int32_t pos, DynamicPluginTensorDesc const* io, int32_t nin, int32_t nout)
{
    return build(p)->supportsFormatCombination(pos, io, nin, nout) ? 1 : 0;
}

H_API int32_t h_configure(void* p, DynamicPluginTensorDesc const* in, int32_t nin, DynamicPluginTensorDesc const* out,
    int32_t nout)
{
    return build(p)->configurePlugin(in, nin, out, nout);
}

H_API int64_t h_workspace(void* p, DynamicPluginTensorDesc const* in, int32_t nin, DynamicPluginTensorDesc const* out,
    int32_t nout)
{
    return static_cast<int64_t>(build(p)->getWorkspaceSize(in, nin, out, nout));
}

H_API PluginFieldCollection const* h_serialize(void* p)
{
    return runtime(p)->getFieldsToSerialize();
}

H_API int32_t h_on_shape_change(void* p, PluginTensorDesc const* in, int32_t nin, PluginTensorDesc const* out,
    int32_t nout)
{
    return runtime(p)->onShapeChange(in, nin, out, nout);
}

H_API void* h_clone(void* p)
{
    return static_cast<IPluginV3*>(p)->clone();
}

H_API void* h_attach(void* p)
{
    return runtime(p)->attachToContext(nullptr);
}

H_API int32_t h_plan(void* lib, void* p, int32_t arch, char* out, int32_t n)
{
    auto* L = static_cast<Library*>(lib);
    if (L->describe == nullptr)
    {
        return copyOut("the library exports no dsmoe_trt_describe_plan", out, n), -1;
    }
    return L->describe(static_cast<IPluginV3*>(p), arch, out, n);
}

H_API int32_t h_enqueue(void* p, PluginTensorDesc const* in, PluginTensorDesc const* out, void const* const* inputs,
    void* const* outputs, void* workspace, void* stream)
{
    return runtime(p)->enqueue(in, out, inputs, outputs, workspace, static_cast<cudaStream_t>(stream));
}
