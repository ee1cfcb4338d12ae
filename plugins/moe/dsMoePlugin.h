// DsMoE, version 1 (namespace dsmoe): dsmoe::moe (the routed experts) as a TensorRT IPluginV3.
//
//   x [T,H] fp32|bf16|fp16, weights [T,K] fp32, ids [T,K] int32, w13 [E,2I,H] x's dtype,
//   w2 [E,H,I] x's dtype  ->  y [T,H] x's dtype
//
// Field: activation (silu). enqueue() zeroes `counts` and launches the six AOT moe kernels of the
// configuration moe_config's rule chooses, over the workspace laid out by the manifest's buffer
// formulas. See README.md.
#pragma once

#include "dsPluginCommon.h"

#include <string>

namespace dsmoe
{

class DsMoePlugin : public DsPluginBase
{
public:
    static constexpr char const* kName = kMoeName;
    static constexpr char const* kVersion = kMoeVersion;
    static constexpr FieldSpec const* kFields = kMoeFields;
    static constexpr int32_t kNbFields = kMoeNbFields;

    static nvinfer1::IPluginV3* create(std::string const& layer, nvinfer1::PluginFieldCollection const* fc,
        std::string& err);

    nvinfer1::IPluginV3* clone() noexcept override;
    char const* getPluginName() const noexcept override { return kName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }

    int32_t getNbOutputs() const noexcept override { return kMoeNbOutputs; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
        int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    std::size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;

    bool plan(int32_t arch, Plan& out, std::string& err) const noexcept override;

private:
    //! validate_moe's checks on (T, H, E, K, I) from the five input shapes (-1: not known yet),
    //! plus the AOT kernels' H, I % 16.
    static bool checkShapes(int64_t const* x, int64_t const* w, int64_t const* ids, int64_t const* w13,
        int64_t const* w2, Sizes& s, std::string& err);
    int32_t fail(char const* where, std::string const& err) const;

    Sizes mSizes{};
    DType mDType{DType::kFP32};
    bool mShaped{false};
};

} // namespace dsmoe
