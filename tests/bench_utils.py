"""Import a script of benchmarks/ in a test (the scripts import their siblings by name, so benchmarks/ goes on
sys.path for the import only)."""
import importlib
import os
import sys

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def import_benchmark(name):
    sys.path.insert(0, BENCH_DIR)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCH_DIR)
