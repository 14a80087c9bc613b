"""Build the Cython core with OpenMP; everything else is in pyproject.toml."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

core = Extension(
    "cllm._core",
    sources=["src/cllm/_core.pyx"],
    include_dirs=[numpy.get_include(), "src/cllm"],
    extra_compile_args=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
    extra_link_args=["-fopenmp"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(ext_modules=cythonize([core], language_level=3,
                            compiler_directives={"boundscheck": False, "wraparound": False,
                                                 "cdivision": True, "initializedcheck": False}))
