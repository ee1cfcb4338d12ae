// The library's entry points, as TensorRT loads a plugin library (IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins): getCreators() lists the creators and setLoggerFinder() hands over
// the logger. Nothing is registered at load time by default, so loading needs neither libnvinfer
// nor a GPU. Tools that load plugin libraries with a bare dlopen (polygraphy --plugins) expect
// static registration: with DSMOE_TRT_REGISTER_ON_LOAD=1 the library registers its creators at
// load time in the registry of a libnvinfer already loaded in the process (never loading one).
#include "../moe/dsMoePlugin.h"
#include "../route/dsRoutePlugin.h"

#include "NvInferRuntime.h"

#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <string>

#define DSMOE_API extern "C" __attribute__((visibility("default")))

namespace
{
dsmoe::DsCreator<dsmoe::DsRoutePlugin> gRouteCreator;
dsmoe::DsCreator<dsmoe::DsMoePlugin> gMoeCreator;
nvinfer1::IPluginCreatorInterface* const gCreators[] = {&gRouteCreator, &gMoeCreator};
} // namespace

DSMOE_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    dsmoe::setLoggerFinder(finder);
}

DSMOE_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = static_cast<int32_t>(sizeof(gCreators) / sizeof(gCreators[0]));
    return gCreators;
}

namespace
{
void registerOnLoad()
{
    char const* flag = std::getenv("DSMOE_TRT_REGISTER_ON_LOAD");
    if (flag == nullptr || std::strcmp(flag, "1") != 0)
    {
        return;
    }
    std::string const major = "libnvinfer.so." + std::to_string(NV_TENSORRT_MAJOR);
    void* nvinfer = nullptr;
    for (char const* name : {major.c_str(), "libnvinfer.so"})
    {
        nvinfer = nvinfer != nullptr ? nvinfer : dlopen(name, RTLD_NOW | RTLD_NOLOAD);
    }
    using GetRegistry = nvinfer1::IPluginRegistry* (*) ();
    auto get = nvinfer != nullptr ? reinterpret_cast<GetRegistry>(dlsym(nvinfer, "getPluginRegistry")) : nullptr;
    nvinfer1::IPluginRegistry* registry = get != nullptr ? get() : nullptr;
    if (registry == nullptr)
    {
        dsmoe::logWarning("DSMOE_TRT_REGISTER_ON_LOAD=1 but no " + major + " is loaded in this process: "
                          "nothing registered (load the library with IPluginRegistry::loadLibrary instead)");
        return;
    }
    for (nvinfer1::IPluginCreatorInterface* c : gCreators)
    {
        registry->registerCreator(*c, dsmoe::kNamespace);
    }
}
// A namespace-scope object defined after gCreators: initialized after them (one translation unit's
// dynamic initialization runs in order of definition), when the library is loaded.
struct RegisterOnLoad
{
    RegisterOnLoad()
    {
        registerOnLoad();
    }
} gRegisterOnLoad;
} // namespace
