"""Print which kernels the zoo's hybrid models run here: ``python -m hf_marconi.kernels [--device cuda]``.

The models are the tiny random ones of :mod:`hf_marconi.testing`, built from configs (nothing is downloaded); the
kernel choice depends only on the model classes and the installed packages, so a real checkpoint of the same
family resolves the same way.
"""

from __future__ import annotations

import argparse
import logging

import torch

from ..testing import FAMILIES, build_model, family_spec
from .detect import kernel_report

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    recurrent = [name for name in FAMILIES if family_spec(name).recurrent_kind is not None]
    parser = argparse.ArgumentParser(prog="python -m hf_marconi.kernels", description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--family", action="append", choices=recurrent, help="repeatable; default: all")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16" if cuda else "float32")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 unless every family runs kernels")
    args = parser.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    all_fast = True
    for family in args.family or recurrent:
        model = build_model(family, dtype=_DTYPES[args.dtype]).to(args.device)
        report = kernel_report(model)
        all_fast &= report.kernels_in_use
        print(f"[{family}] {report}")
    return 0 if all_fast or not args.strict else 1


if __name__ == "__main__":
    raise SystemExit(main())
