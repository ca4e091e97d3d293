"""The local API: the aiohttp app (``app``) with its routes per family (``inference``,
``repository``, ``shared_memory``, ``operator``) and what they share (``context``); the tensor
codec (``tensors``), system shared memory (``shm``), and the client the CLI uses (``client``)."""
