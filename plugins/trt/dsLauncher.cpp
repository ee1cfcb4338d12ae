// Launch plans of the AOT kernels (see dsLauncher.h); their launch: dsLaunch.cpp.
#include "dsLauncher.h"

#include "dsmoe_plugin_spec.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <sstream>

namespace dsmoe
{
namespace
{
std::size_t alignUp(std::size_t n)
{
    auto const a = static_cast<std::size_t>(kWorkspaceAlign);
    return (n + a - 1) / a * a;
}

//! Offsets and sizes of a configuration's buffers; the total in ``total``.
bool layoutBuffers(ConfigSpec const& c, DType dtype, Sizes const& s, std::size_t* offset, std::size_t* bytes,
    std::size_t& total, std::string& err)
{
    total = 0;
    if (c.nbBuffers > kMaxBuffers)
    {
        err = "too many workspace buffers";
        return false;
    }
    for (int32_t b = 0; b < c.nbBuffers; ++b)
    {
        BufferSpec const& buf = c.buffers[b];
        int64_t const n = buf.numel(s);
        if (n < 0)
        {
            err = std::string("negative size of workspace buffer ") + buf.name;
            return false;
        }
        int64_t const elem = buf.elemBytes == 0 ? dtypeBytes(dtype) : buf.elemBytes;
        offset[b] = total;
        bytes[b] = static_cast<std::size_t>(n * elem);
        total += alignUp(bytes[b]);
    }
    return true;
}
} // namespace

bool makePlan(Op op, int32_t arch, DType dtype, Sizes const& sizes, ScalarValue const* scalars, int32_t nbScalars,
    Plan& plan, std::string& err) noexcept
{
    // 1. the configuration whose rule holds (one per op, arch and dtype, as route_config/moe_config choose)
    plan = Plan{};
    ConfigSpec const* chosen = nullptr;
    for (int32_t i = 0; i < kNbConfigs; ++i)
    {
        ConfigSpec const& c = kConfigs[i];
        if (c.op == op && c.arch == arch && c.dtype == dtype && c.when(sizes))
        {
            if (chosen != nullptr)
            {
                err = std::string("two launch configurations hold: ") + chosen->rule + " and " + c.rule;
                return false;
            }
            chosen = &c;
        }
    }
    if (chosen == nullptr)
    {
        err = std::string("no kernels built for sm_") + std::to_string(arch) + " and " + dtypeName(dtype)
            + " in this library (rebuild it: dsmoe build-plugins --arch sm_" + std::to_string(arch) + ")";
        return false;
    }
    if (chosen->nbLaunches > kMaxLaunches || nbScalars > kMaxScalars)
    {
        err = "launch plan too large";
        return false;
    }
    plan.config = chosen;
    plan.dtype = dtype;
    plan.sizes = sizes;
    // 2. scalars: the plugin's, then the configuration's derived ones (P, MB)
    plan.nbScalars = nbScalars;
    std::copy(scalars, scalars + nbScalars, plan.scalars);
    for (int32_t d = 0; d < chosen->nbDerived; ++d)
    {
        plan.scalars[chosen->derived[d].slot].i = chosen->derived[d].value(sizes);
    }
    // 3. grids, in launch order
    plan.nbLaunches = chosen->nbLaunches;
    for (int32_t l = 0; l < chosen->nbLaunches; ++l)
    {
        KernelSpec const& k = kKernels[chosen->launches[l]];
        plan.kernels[l] = &k;
        for (int32_t g = 0; g < 3; ++g)
        {
            plan.grid[l][g] = k.grid[g](sizes);
            int64_t const limit = g == 0 ? std::numeric_limits<int32_t>::max() : 65535;
            if (plan.grid[l][g] < 0 || plan.grid[l][g] > limit)
            {
                err = std::string(k.kernel) + ": grid dimension " + std::to_string(plan.grid[l][g])
                    + " is beyond CUDA's limit";
                return false;
            }
        }
        for (int32_t a = 0; a < k.nbArgs; ++a)
        {
            ArgSpec const& arg = k.args[a];
            if (arg.kind != ArgKind::kScalarI32)
            {
                continue;
            }
            int64_t const v = plan.scalars[arg.index].i;
            if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
            {
                err = std::string(k.kernel) + ": argument " + arg.name + " = " + std::to_string(v)
                    + " does not fit the kernel's int32";
                return false;
            }
        }
    }
    // 4. workspace layout
    plan.nbBuffers = chosen->nbBuffers;
    return layoutBuffers(*chosen, dtype, sizes, plan.offset, plan.bytes, plan.workspace, err);
}

std::size_t workspaceBound(Op op, DType dtype, Sizes const& sizes) noexcept
{
    std::size_t best = 0;
    for (int32_t i = 0; i < kNbConfigs; ++i)
    {
        ConfigSpec const& c = kConfigs[i];
        std::size_t offset[kMaxBuffers], bytes[kMaxBuffers], total = 0;
        std::string err;
        if (c.op == op && c.dtype == dtype && layoutBuffers(c, dtype, sizes, offset, bytes, total, err))
        {
            best = std::max(best, total);
        }
    }
    return best;
}

int32_t kernelArch(int32_t cc) noexcept
{
    int32_t best = -1;
    for (int32_t i = 0; i < kNbArchs; ++i)
    {
        int32_t const a = kArchs[i];
        bool const runs = a == cc || (a / 10 == cc / 10 && a < cc && a != 90);
        if (runs && a > best)
        {
            best = a;
        }
    }
    return best;
}

std::string describePlan(Plan const& plan)
{
    std::ostringstream o;
    ConfigSpec const& c = *plan.config;
    o << "{\"arch\": " << c.arch << ", \"dtype\": \"" << dtypeName(c.dtype) << "\", \"path\": \"" << c.path
      << "\", \"when\": \"" << c.rule << "\", \"workspace\": " << plan.workspace << ", \"launches\": [";
    for (int32_t l = 0; l < plan.nbLaunches; ++l)
    {
        KernelSpec const& k = *plan.kernels[l];
        o << (l ? ", " : "") << "{\"id\": \"" << k.id << "\", \"kernel\": \"" << k.kernel << "\", \"grid\": ["
          << plan.grid[l][0] << ", " << plan.grid[l][1] << ", " << plan.grid[l][2] << "], \"block\": " << k.threads
          << ", \"shared_bytes\": " << k.sharedBytes << ", \"num_stages\": " << k.numStages
          << ", \"constexprs\": " << k.constexprs << ", \"args\": {";
        for (int32_t a = 0; a < k.nbArgs; ++a)
        {
            ArgSpec const& arg = k.args[a];
            o << (a ? ", " : "") << "\"" << arg.name << "\": ";
            switch (arg.kind)
            {
            case ArgKind::kScalarI32: o << plan.scalars[arg.index].i; break;
            case ArgKind::kScalarF32: o << plan.scalars[arg.index].f; break;
            case ArgKind::kInput: o << "\"in:" << arg.index << "\""; break;
            case ArgKind::kOutput: o << "\"out:" << arg.index << "\""; break;
            case ArgKind::kWorkspace: o << "\"ws:" << c.buffers[arg.index].name << "\""; break;
            case ArgKind::kInputOrWorkspace:
                o << "\"in:" << arg.index << "|ws:" << c.buffers[arg.fallback].name << "\"";
                break;
            case ArgKind::kNull: o << "null"; break;
            }
        }
        o << "}}";
    }
    o << "], \"buffers\": [";
    for (int32_t b = 0; b < plan.nbBuffers; ++b)
    {
        o << (b ? ", " : "") << "{\"name\": \"" << c.buffers[b].name << "\", \"offset\": " << plan.offset[b]
          << ", \"bytes\": " << plan.bytes[b] << ", \"zeroed\": " << (c.buffers[b].zeroed ? "true" : "false") << "}";
    }
    o << "]}";
    return o.str();
}

} // namespace dsmoe
