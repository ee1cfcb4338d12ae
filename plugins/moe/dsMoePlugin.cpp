// DsMoE: dsmoe::moe as a TensorRT IPluginV3 (see dsMoePlugin.h and README.md).
#include "dsMoePlugin.h"

#include <exception>
#include <memory>

using namespace nvinfer1;

namespace dsmoe
{
namespace
{
enum Input : int32_t
{
    kX = 0,
    kWeights = 1,
    kIds = 2,
    kW13 = 3,
    kW2 = 4
};
constexpr int32_t kRanks[] = {2, 2, 2, 3, 3};

//! a == b when both are known (>= 0)
bool agree(int64_t a, int64_t b)
{
    return a < 0 || b < 0 || a == b;
}
} // namespace

IPluginV3* DsMoePlugin::create(std::string const& layer, PluginFieldCollection const* fc, std::string& err)
{
    auto p = std::make_unique<DsMoePlugin>();
    p->mLayer = layer;
    if (!p->mFields.parse(kName, kFields, kNbFields, fc, err))
    {
        return nullptr;
    }
    return p.release();
}

IPluginV3* DsMoePlugin::clone() noexcept
{
    try
    {
        return new DsMoePlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string(kName) + " clone: " + e.what());
    }
    return nullptr;
}

bool DsMoePlugin::checkShapes(int64_t const* x, int64_t const* w, int64_t const* ids, int64_t const* w13,
    int64_t const* w2, Sizes& s, std::string& err)
{
    s = Sizes{x[0], x[1], w13[0], ids[1], w13[1] < 0 ? -1 : w13[1] / 2};
    bool const consistent = agree(ids[0], x[0]) && agree(w[0], ids[0]) && agree(w[1], ids[1]) && agree(w13[2], s.H)
        && (w13[1] < 0 || w13[1] % 2 == 0) && agree(w2[0], s.E) && agree(w2[1], s.H) && agree(w2[2], s.I);
    if (!consistent)
    {
        err = "inconsistent shapes: want x [T,H], weights [T,K], ids [T,K], w13 [E,2I,H], w2 [E,H,I]";
        return false;
    }
    if (s.K == 0 || s.E == 0 || s.E > kMoeMaxE)
    {
        err = "need K >= 1 and 1 <= E <= " + std::to_string(kMoeMaxE) + ", got K=" + std::to_string(s.K)
            + ", E=" + std::to_string(s.E);
        return false;
    }
    for (int64_t v : {s.H, s.I})
    {
        if (v == 0 || (v > 0 && v % kAlign != 0))
        {
            err = "H=" + std::to_string(s.H) + " and I=" + std::to_string(s.I) + " must be positive multiples of "
                + std::to_string(kAlign) + " (the AOT kernels)";
            return false;
        }
    }
    return true;
}

int32_t DsMoePlugin::fail(char const* where, std::string const& err) const
{
    logError(std::string(kName) + " (" + mLayer + ") " + where + ": " + err);
    return 1;
}

int32_t DsMoePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    DType d;
    if (nbInputs != kMoeNbInputs || nbOutputs != kMoeNbOutputs || !toDType(inputTypes[kX], d))
    {
        return fail("getOutputDataTypes", "wants 5 inputs (x fp32|bf16|fp16, weights, ids, w13, w2) and 1 output");
    }
    outputTypes[0] = inputTypes[kX];
    return 0;
}

int32_t DsMoePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    (void) shapeInputs;
    (void) exprBuilder;
    if (nbInputs != kMoeNbInputs || nbOutputs != kMoeNbOutputs || nbShapeInputs != 0)
    {
        return fail("getOutputShapes", "wants inputs (x, weights, ids, w13, w2) and one output");
    }
    int64_t dims[kMoeNbInputs][3];
    for (int32_t i = 0; i < kMoeNbInputs; ++i)
    {
        if (inputs[i].nbDims != kRanks[i])
        {
            return fail("getOutputShapes", "want x [T,H], weights [T,K], ids [T,K], w13 [E,2I,H], w2 [E,H,I]");
        }
        for (int32_t j = 0; j < kRanks[i]; ++j)
        {
            dims[i][j] = constantOr(inputs[i].d[j]);
        }
    }
    Sizes s;
    std::string err;
    if (!checkShapes(dims[kX], dims[kWeights], dims[kIds], dims[kW13], dims[kW2], s, err))
    {
        return fail("getOutputShapes", err);
    }
    outputs[0] = inputs[kX]; // y [T,H]
    return 0;
}

bool DsMoePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    (void) nbInputs;
    (void) nbOutputs;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    DType dt;
    switch (pos)
    {
    case kX: return toDType(d.type, dt);
    case kWeights: return d.type == DataType::kFLOAT;
    case kIds: return d.type == DataType::kINT32;
    default: return d.type == inOut[kX].desc.type; // w13, w2, y: x's dtype
    }
}

int32_t DsMoePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    (void) out;
    if (nbInputs != kMoeNbInputs || nbOutputs != kMoeNbOutputs)
    {
        return fail("configurePlugin", "wants 5 inputs and 1 output");
    }
    int64_t dims[kMoeNbInputs][3]{};
    for (int32_t i = 0; i < kMoeNbInputs; ++i)
    {
        if (in[i].desc.dims.nbDims != kRanks[i])
        {
            return fail("configurePlugin", "want x [T,H], weights [T,K], ids [T,K], w13 [E,2I,H], w2 [E,H,I]");
        }
        for (int32_t j = 0; j < kRanks[i]; ++j)
        {
            dims[i][j] = in[i].desc.dims.d[j];
        }
    }
    Sizes s;
    std::string err;
    if (!checkShapes(dims[kX], dims[kWeights], dims[kIds], dims[kW13], dims[kW2], s, err))
    {
        return fail("configurePlugin", err);
    }
    if (s.H < 0 || s.E < 0 || s.I < 0 || s.K < 0)
    {
        return fail("configurePlugin", "H, E, K and I must be known when the engine is built");
    }
    return 0;
}

std::size_t DsMoePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept
{
    (void) nbInputs;
    (void) outputs;
    (void) nbOutputs;
    DType d;
    if (!toDType(inputs[kX].desc.type, d))
    {
        return 0;
    }
    // the largest T (and K) of the profile bounds every smaller problem
    Dims const& x = inputs[kX].max;
    Dims const& w2 = inputs[kW2].max;
    Sizes const s{x.d[0], x.d[1], w2.d[0], inputs[kIds].max.d[1], w2.d[2]};
    return workspaceBound(Op::kMoe, d, s);
}

int32_t DsMoePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    (void) out;
    DType d;
    if (nbInputs != kMoeNbInputs || nbOutputs != kMoeNbOutputs || !toDType(in[kX].type, d))
    {
        return fail("onShapeChange", "wants 5 inputs (x fp32|bf16|fp16, ...) and 1 output");
    }
    int64_t dims[kMoeNbInputs][3]{};
    for (int32_t i = 0; i < kMoeNbInputs; ++i)
    {
        if (in[i].dims.nbDims != kRanks[i])
        {
            return fail("onShapeChange", "want x [T,H], weights [T,K], ids [T,K], w13 [E,2I,H], w2 [E,H,I]");
        }
        for (int32_t j = 0; j < kRanks[i]; ++j)
        {
            dims[i][j] = in[i].dims.d[j];
        }
    }
    Sizes s;
    std::string err;
    if (!checkShapes(dims[kX], dims[kWeights], dims[kIds], dims[kW13], dims[kW2], s, err) || s.T < 0)
    {
        return fail("onShapeChange", err.empty() ? "T is not known" : err);
    }
    mSizes = s;
    mDType = d;
    mNbInputs = nbInputs;
    mShaped = true;
    return 0;
}

bool DsMoePlugin::plan(int32_t arch, Plan& out, std::string& err) const noexcept
{
    if (!mShaped)
    {
        err = "no shapes yet (onShapeChange has not run)";
        return false;
    }
    ScalarValue s[kMoeNbScalars]{};
    s[kMoeS_T].i = mSizes.T;
    s[kMoeS_H].i = mSizes.H;
    s[kMoeS_E].i = mSizes.E;
    s[kMoeS_K].i = mSizes.K;
    s[kMoeS_I].i = mSizes.I;
    // P and MB: the configuration's derived sizes (they depend on its BLOCK_M)
    return makePlan(Op::kMoe, arch, mDType, mSizes, s, kMoeNbScalars, out, err);
}

} // namespace dsmoe
