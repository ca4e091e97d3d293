"""``edged demo``: the whole loop on one machine (``run``), on sample models shipped with the
package (``models/``, a symlink to the checkout's top-level ``models/`` that a wheel build
resolves into files, and ``sources/``, the version the demo pushes). ``samples`` regenerates
them and builds the test and benchmark models; it needs the optional ``samples`` extra (onnx).
"""

from edged.demo.run import run_demo

__all__ = ["run_demo"]
