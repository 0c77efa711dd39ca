"""Benchmarks behind `nmkit bench ...`: each module exposes add_arguments(parser) and run(args)."""
