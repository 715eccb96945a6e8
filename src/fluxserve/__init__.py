"""fluxserve: a self-hosted FLUX image API server."""

__version__ = "0.1.0"
