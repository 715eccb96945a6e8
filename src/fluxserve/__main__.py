"""``python -m fluxserve``."""

from fluxserve.cli import app

app()
