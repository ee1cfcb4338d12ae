// DsRoute, version 1 (namespace dsmoe): dsmoe::route as a TensorRT IPluginV3.
//
//   x [T,H] fp32|bf16|fp16, w_gate [E,H] x's dtype, bias [E] fp32 (optional)
//     -> weights [T,K] fp32, ids [T,K] int32
//
// Fields (dsmoe_plugin_spec.h, from plugins/trt/spec.py): scoring, topk_method, top_k, n_group,
// topk_group, norm_topk_prob, scaling, scale_when. enqueue() launches the AOT route kernels
// (route_logits_kernel, route_select_kernel) chosen by route_config's rule. See README.md.
#pragma once

#include "dsPluginCommon.h"

#include <string>

namespace dsmoe
{

class DsRoutePlugin : public DsPluginBase
{
public:
    static constexpr char const* kName = kRouteName;
    static constexpr char const* kVersion = kRouteVersion;
    static constexpr FieldSpec const* kFields = kRouteFields;
    static constexpr int32_t kNbFields = kRouteNbFields;

    //! A plugin from fields, or nullptr and why (the field checks that need no shapes).
    static nvinfer1::IPluginV3* create(std::string const& layer, nvinfer1::PluginFieldCollection const* fc,
        std::string& err);

    // IPluginV3 / Core
    nvinfer1::IPluginV3* clone() noexcept override;
    char const* getPluginName() const noexcept override { return kName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }

    // Build
    int32_t getNbOutputs() const noexcept override { return kRouteNbOutputs; }
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

    // Runtime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;

    bool plan(int32_t arch, Plan& out, std::string& err) const noexcept override;

private:
    //! The kernel codes of the fields (route_config.validate_route's RouteAttrs).
    struct Attrs
    {
        int32_t K, nGroup, topkGroup, scoring, method, normalize, scale;
        float scaling;
    };

    bool grouped() const;
    //! The checks that need E and H (validate_route's, plus the AOT kernels' H % 16).
    bool checkShapes(int64_t E, int64_t H, std::string& err) const;
    bool checkIO(int32_t nbInputs, int32_t nbOutputs, std::string& err) const;
    int32_t fail(char const* where, std::string const& err) const;

    Attrs mAttrs{};
    Sizes mSizes{};
    DType mDType{DType::kFP32};
    bool mShaped{false};
};

} // namespace dsmoe
