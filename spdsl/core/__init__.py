"""spdsl's core: exactly what a generated module embeds (torch and the standard library only).

* :mod:`.errors` -- :class:`SpdError`;
* :mod:`.limits` -- resource limits, checked before work is spent;
* :mod:`.ir` -- expressions, set operations, :class:`PatternIR`, the torch backend, the
  ``q_offset`` default;
* :mod:`.primitives` -- the language's primitives, one class each;
* :mod:`.refine` -- the refinement engine (any / all visible over token rectangles);
* :mod:`.layout` -- analytic tile layouts (q-major CSR, its kv-major transpose), dense masks;
* :mod:`.checks` -- input validation shared by the reference, the op and generated modules.

:mod:`spdsl.codegen.embed` copies the definitions a pattern needs from these files into its
generated module; nothing here may import outside this package except torch and the stdlib.
"""
