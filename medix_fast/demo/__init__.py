"""The embedded default: the tiny text model (``tiny.py``) and its VL variant (``tiny_vl.py``), built
offline and cached (``cache.py``), and the generators of the bundled sample set (``sample_data.py``,
``sample_images.py``)."""
