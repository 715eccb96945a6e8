"""The ``diffusers`` engines: FLUX pipelines on local weights, one route's semantics at a time.

Split by job, each module documenting its part (import from them directly; nothing is re-exported here):

- :mod:`~fluxserve.engines.flux.options`: the catalog's ``options`` table (loading and route knobs).
- :mod:`~fluxserve.engines.flux.loading`: one set of weights in memory, the pipelines sharing it, and the
  loading knobs (device, dtype, quantization, compilation, batch invariance, the guidance-schedule hook).
- :mod:`~fluxserve.engines.flux.planning`: everything decided about a request before a pipeline runs:
  input checks, steps and guidance, the generation size, and the pipeline route.
- :mod:`~fluxserve.engines.flux.engine`: the engine, which plans each request once and runs plans alone or
  batched.
- :mod:`~fluxserve.engines.flux.flux2`: FLUX.2 [dev] and [klein] weights (Flux2Pipeline,
  Flux2KleinPipeline): text to image and multi-reference editing.
- :mod:`~fluxserve.engines.flux.fill`: FLUX.1 Fill weights (FluxFillPipeline): fill and expand.
- :mod:`~fluxserve.engines.flux.single`: what those two engines share (one pipeline call per request).
"""
