// What every dsmoe TensorRT plugin shares: field parsing and serialization (the field table of
// dsmoe_plugin_spec.h, generated from plugins/trt/spec.py), logging through the logger TensorRT
// hands the library, the IPluginV3 capability glue, and a creator template.
#pragma once

#include "NvInferRuntime.h"
#include "dsLauncher.h"
#include "dsmoe_plugin_spec.h"

#include <cstdint>
#include <string>
#include <vector>

namespace dsmoe
{

// ---- logging: the ILogger of setLoggerFinder(), else stderr; the last error per thread -----------
void logError(std::string const& msg) noexcept;
void logWarning(std::string const& msg) noexcept;
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
char const* lastError() noexcept;

// ---- fields ----------------------------------------------------------------------------------
//! The values of a plugin's fields: parsed from a PluginFieldCollection against the field table
//! (type, range, choices; defaults for absent optional fields; unknown or repeated names refused),
//! and serialized back as a PluginFieldCollection with every field.
class Fields
{
public:
    Fields() = default;
    Fields(Fields const& other);
    Fields& operator=(Fields const& other);

    //! False (and why in ``err``) when the collection does not describe valid fields.
    bool parse(char const* plugin, FieldSpec const* specs, int32_t nbSpecs, nvinfer1::PluginFieldCollection const* fc,
        std::string& err);

    int64_t integer(int32_t i) const { return mInts.at(i); }
    float real(int32_t i) const { return mFloats.at(i); }
    std::string const& text(int32_t i) const { return mStrings.at(i); }
    //! The index of a string field's value among its choices (its kernel code).
    int32_t code(int32_t i) const;

    nvinfer1::PluginFieldCollection const* serialize();

private:
    FieldSpec const* mSpecs{nullptr};
    int32_t mNbSpecs{0};
    std::vector<int64_t> mInts;
    std::vector<float> mFloats;
    std::vector<std::string> mStrings;
    // storage of serialize()
    std::vector<int32_t> mIntStore;
    std::vector<nvinfer1::PluginField> mFieldStore;
    nvinfer1::PluginFieldCollection mFc{};
};

//! The DType of a TensorRT data type the kernels take (fp32, bf16, fp16), else false.
bool toDType(nvinfer1::DataType t, DType& out) noexcept;

// ---- the plugin base ---------------------------------------------------------------------------
//! IPluginV3 with the Core, Build and Runtime capabilities. A plugin supplies its name/version,
//! fields, shape/type rules, and ``plan()``: the launch plan of the shapes last seen by
//! onShapeChange() on an architecture, which enqueue() launches (and the harness inspects).
class DsPluginBase : public nvinfer1::IPluginV3,
                     public nvinfer1::IPluginV3OneCore,
                     public nvinfer1::IPluginV3OneBuild,
                     public nvinfer1::IPluginV3OneRuntime
{
public:
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override { return mFields.serialize(); }
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

    //! The launch plan for the shapes of the last onShapeChange() on ``arch`` (80, 90, ...).
    virtual bool plan(int32_t arch, Plan& out, std::string& err) const noexcept = 0;

protected:
    Fields mFields;
    std::string mLayer;
    int32_t mNbInputs{0}; // of the last onShapeChange()
};

// ---- the creator ---------------------------------------------------------------------------------
//! The creator of plugin ``P``: ``P::create(layer, fields, err)`` returns a plugin or nullptr with
//! the reason, which the creator logs (TensorRT then reports the node it could not create).
template <typename P>
class DsCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    DsCreator()
    {
        for (int32_t i = 0; i < P::kNbFields; ++i)
        {
            FieldSpec const& f = P::kFields[i];
            auto t = f.kind == FieldKind::kInt ? nvinfer1::PluginFieldType::kINT32
                : f.kind == FieldKind::kFloat  ? nvinfer1::PluginFieldType::kFLOAT32
                                               : nvinfer1::PluginFieldType::kCHAR;
            mNames.emplace_back(f.name, nullptr, t, f.kind == FieldKind::kString ? 0 : 1);
        }
        mFc.nbFields = static_cast<int32_t>(mNames.size());
        mFc.fields = mNames.data();
    }

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override
    {
        (void) phase; // the same fields in both phases: getFieldsToSerialize() writes every one
        try
        {
            std::string err;
            nvinfer1::IPluginV3* p = P::create(name ? name : "", fc, err);
            if (p == nullptr)
            {
                logError(std::string(P::kName) + " (" + (name ? name : "") + "): " + err);
            }
            return p;
        }
        catch (std::exception const& e)
        {
            logError(std::string(P::kName) + ": " + e.what());
        }
        return nullptr;
    }

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFc; }
    char const* getPluginName() const noexcept override { return P::kName; }
    char const* getPluginVersion() const noexcept override { return P::kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }

private:
    std::vector<nvinfer1::PluginField> mNames;
    nvinfer1::PluginFieldCollection mFc{};
};

// ---- shape helpers -------------------------------------------------------------------------------
//! The dimension value of an expression when it is a build-time constant, else -1.
inline int64_t constantOr(nvinfer1::IDimensionExpr const* e, int64_t otherwise = -1)
{
    return (e != nullptr && e->isConstant()) ? e->getConstantValue() : otherwise;
}

} // namespace dsmoe
