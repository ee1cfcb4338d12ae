// The library's entry points, as TensorRT loads a plugin library (IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins, polygraphy --plugins): getCreators() lists the creators and
// setLoggerFinder() hands over the logger. Nothing is registered at load time, so loading needs
// neither libnvinfer nor a GPU.
#include "../moe/dsMoePlugin.h"
#include "../route/dsRoutePlugin.h"

#include "NvInferRuntime.h"

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
