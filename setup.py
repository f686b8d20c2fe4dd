"""Build hook for the compiled parts of mamfusion; everything else is configured in pyproject.toml.

The fused search kernel (tasks/_scan_fp16.c) and the fused CPU selective scan (models/_selective_scan.c) are
optional extensions. The search kernel: `pip install -e .` builds it in place
next to tasks/scan.py, and where no C compiler works the install still succeeds and search uses the
matrix-product kernel. It is compiled for the architecture's baseline and picks its vector path at run time,
so one build (or wheel) serves every CPU of an architecture.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tasks._scan_fp16",
            sources=["tasks/_scan_fp16.c"],
            depends=["tasks/_scan_fp16_loops.h"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "models._selective_scan",
            sources=["models/_selective_scan.c"],
            depends=["models/_selective_scan_kernel.h"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
    ]
)
