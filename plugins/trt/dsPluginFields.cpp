// Plugin fields: parsed against the generated field table, serialized back (see dsPluginCommon.h).
#include "dsPluginCommon.h"

#include <cmath>
#include <cstring>

namespace dsmoe
{
namespace
{
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

} // namespace dsmoe
