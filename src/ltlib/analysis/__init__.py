"""Run results: ``results.json``, ``per_class.csv``, the per-class accuracy plot, console tables."""

from ltlib.analysis.results import (
    PER_CLASS_CSV,
    PER_CLASS_PLOT,
    RESULTS_JSON,
    print_results_table,
    read_results,
    save_figure,
    to_jsonable,
    write_results,
)

__all__ = [
    "PER_CLASS_CSV",
    "PER_CLASS_PLOT",
    "RESULTS_JSON",
    "print_results_table",
    "read_results",
    "save_figure",
    "to_jsonable",
    "write_results",
]
