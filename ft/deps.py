"""Whether a package ft needs loads, and a one-line refusal naming what to install.

Its own module so that :mod:`ft.processor` and :mod:`ft.video`, which both check a
package, need not import each other.
"""

from __future__ import annotations

__all__ = ["MissingDependency", "require"]


class MissingDependency(RuntimeError):
    """A package ft needs is not installed or does not load; the message says what to install."""


def require(module: str, why: str) -> None:
    """Import `module` or raise MissingDependency naming the pip package to install.

    torchvision is the one that fails in surprising ways: a PyPI torchvision built for
    another torch release raises RuntimeError ("operator torchvision::nms does not
    exist") rather than ImportError, so both count as missing.
    """
    try:
        __import__(module)
    except (ImportError, RuntimeError) as e:
        import torch

        hint = (f"the torchvision release built for torch {torch.__version__.split('+')[0]} "
                f"(torch 2.14.1 pairs with torchvision 0.29.1, 2.11 with 0.26)"
                if module == "torchvision" else module)
        raise MissingDependency(f"{why} needs `{module}`, which does not load ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else 'not installed'}): pip install {hint}") from e
