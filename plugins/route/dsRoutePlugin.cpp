// DsRoute: dsmoe::route as a TensorRT IPluginV3 (see dsRoutePlugin.h and README.md).
#include "dsRoutePlugin.h"

#include <exception>
#include <memory>

using namespace nvinfer1;

namespace dsmoe
{

IPluginV3* DsRoutePlugin::create(std::string const& layer, PluginFieldCollection const* fc, std::string& err)
{
    // 1. field types, ranges and choices (the table of spec.py)
    auto p = std::make_unique<DsRoutePlugin>();
    p->mLayer = layer;
    if (!p->mFields.parse(kName, kFields, kNbFields, fc, err))
    {
        return nullptr;
    }
    Fields const& f = p->mFields;
    // 2. the kernel codes, as route_config.validate_route makes them
    Attrs& a = p->mAttrs;
    a.K = static_cast<int32_t>(f.integer(kRouteF_top_k));
    a.scoring = f.code(kRouteF_scoring);
    a.method = f.code(kRouteF_topk_method);
    a.normalize = static_cast<int32_t>(f.integer(kRouteF_norm_topk_prob));
    a.scale = (f.code(kRouteF_scale_when) == 0 || a.normalize == 0) ? 1 : 0; // choice 0: "always"
    a.scaling = f.real(kRouteF_scaling);
    int64_t const g = f.integer(kRouteF_n_group), tg = f.integer(kRouteF_topk_group);
    // 3. the group checks that need no shapes
    if (p->grouped())
    {
        if (g > kRouteMaxG)
        {
            err = "n_group must be <= " + std::to_string(kRouteMaxG) + ", got " + std::to_string(g);
            return nullptr;
        }
        if (tg > g)
        {
            err = "topk_group must lie in [1, n_group=" + std::to_string(g) + "], got " + std::to_string(tg);
            return nullptr;
        }
    }
    a.nGroup = p->grouped() ? static_cast<int32_t>(g) : 1;
    a.topkGroup = p->grouped() ? static_cast<int32_t>(tg) : 1;
    return p.release();
}

IPluginV3* DsRoutePlugin::clone() noexcept
{
    try
    {
        return new DsRoutePlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string(kName) + " clone: " + e.what());
    }
    return nullptr;
}

bool DsRoutePlugin::grouped() const
{
    return mFields.code(kRouteF_topk_method) != 0 && mFields.integer(kRouteF_n_group) > 1;
}

bool DsRoutePlugin::checkShapes(int64_t E, int64_t H, std::string& err) const
{
    int64_t const K = mAttrs.K;
    if (E < 1 || E > kRouteMaxE || H < 1)
    {
        err = "need 1 <= E <= " + std::to_string(kRouteMaxE) + " and H >= 1, got E=" + std::to_string(E)
            + ", H=" + std::to_string(H);
        return false;
    }
    if (H % kAlign != 0)
    {
        err = "H=" + std::to_string(H) + " must be divisible by " + std::to_string(kAlign) + " (the AOT kernels)";
        return false;
    }
    if (K > E)
    {
        err = "top_k=" + std::to_string(K) + " exceeds E=" + std::to_string(E);
        return false;
    }
    if (grouped())
    {
        int64_t const g = mAttrs.nGroup;
        if (E % g != 0)
        {
            err = "n_group=" + std::to_string(g) + " must divide E=" + std::to_string(E);
            return false;
        }
        if (K > mAttrs.topkGroup * (E / g))
        {
            err = "top_k=" + std::to_string(K) + " exceeds the " + std::to_string(mAttrs.topkGroup * (E / g))
                + " experts of the kept groups";
            return false;
        }
        if (mAttrs.method == 2 && E / g < 2)
        {
            err = "noaux_tc scores a group by its top-2 experts: need E/n_group >= 2";
            return false;
        }
    }
    return true;
}

bool DsRoutePlugin::checkIO(int32_t nbInputs, int32_t nbOutputs, std::string& err) const
{
    if (nbInputs < kRouteNbInputs - kRouteOptionalInputs || nbInputs > kRouteNbInputs || nbOutputs != kRouteNbOutputs)
    {
        err = "wants inputs (x, w_gate[, bias]) and outputs (weights, ids), got " + std::to_string(nbInputs)
            + " inputs and " + std::to_string(nbOutputs) + " outputs";
        return false;
    }
    return true;
}

int32_t DsRoutePlugin::fail(char const* where, std::string const& err) const
{
    logError(std::string(kName) + " (" + mLayer + ") " + where + ": " + err);
    return 1;
}

int32_t DsRoutePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    std::string err;
    DType d;
    if (!checkIO(nbInputs, nbOutputs, err) || !toDType(inputTypes[0], d))
    {
        return fail("getOutputDataTypes", err.empty() ? "x must be fp32, bf16 or fp16" : err);
    }
    outputTypes[0] = DataType::kFLOAT; // weights
    outputTypes[1] = DataType::kINT32; // ids
    return 0;
}

int32_t DsRoutePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    (void) shapeInputs;
    std::string err;
    if (!checkIO(nbInputs, nbOutputs, err) || nbShapeInputs != 0)
    {
        return fail("getOutputShapes", err.empty() ? "takes no shape inputs" : err);
    }
    if (inputs[0].nbDims != 2 || inputs[1].nbDims != 2 || (nbInputs == 3 && inputs[2].nbDims != 1))
    {
        return fail("getOutputShapes", "wants x [T,H], w_gate [E,H], bias [E]");
    }
    // E and H are constants (w_gate is an initializer): check them now, not at the first run
    int64_t const E = constantOr(inputs[1].d[0]), H = constantOr(inputs[1].d[1]), Hx = constantOr(inputs[0].d[1]);
    if (E >= 0 && H >= 0 && !checkShapes(E, H, err))
    {
        return fail("getOutputShapes", err);
    }
    if ((Hx >= 0 && H >= 0 && Hx != H) || (nbInputs == 3 && E >= 0 && constantOr(inputs[2].d[0], E) != E))
    {
        return fail("getOutputShapes", "x, w_gate and bias disagree on H or E");
    }
    for (int32_t o = 0; o < 2; ++o)
    {
        outputs[o].nbDims = 2;
        outputs[o].d[0] = inputs[0].d[0];
        outputs[o].d[1] = exprBuilder.constant(mAttrs.K);
    }
    return 0;
}

bool DsRoutePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    (void) nbOutputs;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    DType dt;
    if (pos == 0)
    {
        return toDType(d.type, dt);                       // x
    }
    if (pos == 1)
    {
        return d.type == inOut[0].desc.type;              // w_gate: x's dtype
    }
    int32_t const out = pos - nbInputs;                   // bias (input 2), then the outputs
    if (out < 0)
    {
        return d.type == DataType::kFLOAT;
    }
    return d.type == (out == 0 ? DataType::kFLOAT : DataType::kINT32);
}

int32_t DsRoutePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    (void) out;
    std::string err;
    DType d;
    if (!checkIO(nbInputs, nbOutputs, err) || !toDType(in[0].desc.type, d) || in[1].desc.type != in[0].desc.type)
    {
        return fail("configurePlugin", err.empty() ? "x and w_gate must be one of fp32, bf16, fp16" : err);
    }
    if (!checkShapes(in[1].desc.dims.d[0], in[1].desc.dims.d[1], err))
    {
        return fail("configurePlugin", err);
    }
    return 0;
}

std::size_t DsRoutePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept
{
    (void) nbInputs;
    (void) outputs;
    (void) nbOutputs;
    DType d;
    if (!toDType(inputs[0].desc.type, d))
    {
        return 0;
    }
    // the largest T of the profile bounds every smaller one
    Sizes const s{inputs[0].max.d[0], inputs[1].max.d[1], inputs[1].max.d[0], mAttrs.K, 0};
    return workspaceBound(Op::kRoute, d, s);
}

int32_t DsRoutePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    (void) out;
    std::string err;
    DType d;
    if (!checkIO(nbInputs, nbOutputs, err) || !toDType(in[0].type, d) || in[1].type != in[0].type
        || in[0].dims.nbDims != 2 || in[1].dims.nbDims != 2)
    {
        return fail("onShapeChange", err.empty() ? "wants x [T,H] and w_gate [E,H] of one dtype" : err);
    }
    int64_t const T = in[0].dims.d[0], H = in[0].dims.d[1], E = in[1].dims.d[0];
    if (T < 0 || in[1].dims.d[1] != H || !checkShapes(E, H, err))
    {
        return fail("onShapeChange", err.empty() ? "x and w_gate disagree on H" : err);
    }
    mSizes = Sizes{T, H, E, mAttrs.K, 0};
    mDType = d;
    mNbInputs = nbInputs;
    mShaped = true;
    return 0;
}

bool DsRoutePlugin::plan(int32_t arch, Plan& out, std::string& err) const noexcept
{
    if (!mShaped)
    {
        err = "no shapes yet (onShapeChange has not run)";
        return false;
    }
    Attrs const& a = mAttrs;
    ScalarValue s[kRouteNbScalars]{};
    s[kRouteS_T].i = mSizes.T;
    s[kRouteS_H].i = mSizes.H;
    s[kRouteS_E].i = mSizes.E;
    s[kRouteS_K].i = a.K;
    s[kRouteS_n_group].i = a.nGroup;
    s[kRouteS_topk_group].i = a.topkGroup;
    s[kRouteS_scoring].i = a.scoring;
    s[kRouteS_method].i = a.method;
    s[kRouteS_normalize].i = a.normalize;
    s[kRouteS_scale].i = a.scale;
    s[kRouteS_scaling].f = a.scaling;
    return makePlan(Op::kRoute, arch, mDType, mSizes, s, kRouteNbScalars, out, err);
}

} // namespace dsmoe
