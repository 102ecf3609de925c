"""`eosrl study STUDY.yaml`: a set of training runs declared in one YAML file, run
stage by stage as `eosrl train` subprocesses, then summarised in a report.
spec.py reads the file and plans the runs (grids, seeds), runner.py runs them,
report.py writes report.md with the numbers of aggregate.py (runs that differ only
by seed, through the statistics of stats.py) and the figures of figures.py.
The user's page: docs/study.md.
"""
from eosrl.launch.study.spec import (FINISHED, ROOT, SEED_AXIS, RunResult, RunSpec, StudyError, axis_values,
                                     expand_grid, finished_status, flatten, is_finished, load_study,
                                     parse_seeds, plan_study, read_records, resolve_base, safe_name,
                                     seed_name, substitute, summarize_run, yaml_value)
from eosrl.launch.study.aggregate import Group, SeedRun, group_runs, ratio_summary, returns_summary
from eosrl.launch.study.report import report_rows, run_commands_section, status_counts, write_report
from eosrl.launch.study.runner import (Runner, add_study_parser, clear_unfinished, cmd_study, describe,
                                       print_plan, resumable, run_child, run_study)

__all__ = [
    "FINISHED", "ROOT", "SEED_AXIS", "RunResult", "RunSpec", "StudyError", "axis_values", "expand_grid",
    "finished_status", "flatten", "is_finished", "load_study", "parse_seeds", "plan_study", "read_records",
    "resolve_base", "safe_name", "seed_name", "substitute", "summarize_run", "yaml_value",
    "Group", "SeedRun", "group_runs", "ratio_summary", "returns_summary",
    "report_rows", "run_commands_section", "status_counts", "write_report",
    "Runner", "add_study_parser", "clear_unfinished", "cmd_study", "describe", "print_plan",
    "resumable", "run_child", "run_study",
]
