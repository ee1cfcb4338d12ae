// The tables the build generates and the plugins read: plugin fields (dsmoe_plugin_spec.h, from
// spec.py) and the ahead-of-time compiled kernels with their launch configurations
// (dsmoe_kernels.cpp, from the AOT manifest). Plain data, no TensorRT types.
//
// Shape letters: T tokens, H hidden, E experts, K per token, I expert width.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dsmoe
{

// ---- plugin fields ----------------------------------------------------------------------------
enum class FieldKind : int32_t
{
    kInt = 0,
    kFloat = 1,
    kString = 2
};

struct FieldSpec
{
    char const* name;
    FieldKind kind;
    bool required;         // no default: a creation without it is refused
    int64_t defInt;
    float defFloat;
    char const* defString;
    int64_t lo;            // inclusive range of an int field
    int64_t hi;
    char const* const* choices; // the values a string field may take; its code is the index
    int32_t nbChoices;
};

// ---- kernels and launch configurations ---------------------------------------------------------
enum class Op : int32_t
{
    kRoute = 0,
    kMoe = 1
};

enum class DType : int32_t
{
    kFP32 = 0,
    kBF16 = 1,
    kFP16 = 2
};

inline int32_t dtypeBytes(DType t)
{
    return t == DType::kFP32 ? 4 : 2;
}

inline char const* dtypeName(DType t)
{
    return t == DType::kFP32 ? "fp32" : (t == DType::kBF16 ? "bf16" : "fp16");
}

struct Sizes
{
    int64_t T, H, E, K, I;
};

using SizeFn = int64_t (*)(Sizes const&);
using RuleFn = bool (*)(Sizes const&);

enum class ArgKind : int32_t
{
    kInput = 0,            // index: plugin input
    kOutput = 1,           // index: plugin output
    kWorkspace = 2,        // index: buffer of the configuration
    kInputOrWorkspace = 3, // index: optional input; fallback: buffer used when it is absent
    kScalarI32 = 4,        // index: scalar slot
    kScalarF32 = 5,
    kNull = 6              // Triton's trailing scratch pointers
};

struct ArgSpec
{
    char const* name;
    ArgKind kind;
    int32_t index;
    int32_t fallback;
};

struct KernelSpec
{
    char const* id;        // the manifest's kernel id
    char const* kernel;    // the Triton function
    char const* entry;     // the cubin's entry symbol
    int32_t arch;          // 80, 90, ...
    Op op;
    unsigned char const* image;
    std::size_t imageSize;
    int32_t threads;
    int32_t sharedBytes;
    int32_t numStages;
    ArgSpec const* args;
    int32_t nbArgs;
    SizeFn grid[3];
    char const* constexprs; // JSON object, for the harness's launch-parameter checks
};

struct BufferSpec
{
    char const* name;
    int32_t elemBytes;     // 0: the input dtype's size
    SizeFn numel;
    bool zeroed;
};

struct DerivedSpec
{
    int32_t slot;          // scalar slot computed from the sizes (P, MB)
    SizeFn value;
};

struct ConfigSpec
{
    Op op;
    int32_t arch;
    DType dtype;
    char const* path;      // "small" | "large"
    char const* rule;      // the selection rule as text (the manifest's "when")
    RuleFn when;
    int32_t const* launches; // indices into kKernels, in launch order
    int32_t nbLaunches;
    BufferSpec const* buffers;
    int32_t nbBuffers;
    DerivedSpec const* derived;
    int32_t nbDerived;
};

extern KernelSpec const kKernels[];
extern int32_t const kNbKernels;
extern ConfigSpec const kConfigs[];
extern int32_t const kNbConfigs;
extern int32_t const kArchs[];
extern int32_t const kNbArchs;

inline int64_t cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

} // namespace dsmoe
