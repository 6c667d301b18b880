"""Evaluation: the judge contract, judges, score parsing, a resumable results store, aggregation and reports.

Nothing here imports Ray or torch at import time; the VLM judge imports :mod:`mmrole.models` lazily.
"""

from .aggregate import GroupStat, MetricStat, ScoreRow, position_bias, rows_from_results, rows_from_reviews, summarize
from .contract import (
    Judge,
    JudgeRequest,
    JudgeResult,
    build_judge_sample,
    expand_requests,
    result_from_reply,
    rm_training_sample,
)
from .formats import (
    AnswerRecord,
    EvalDataError,
    LoadStats,
    ReviewEntry,
    ReviewRecord,
    answer_record_dict,
    load_answers_file,
    load_reviews_file,
    read_results_csv,
    write_answers_file,
    write_results_csv,
    write_reviews_file,
)
from .judges import JudgeConfigError, VLMJudge
from .metrics import DIMENSIONS, METRICS
from .openai_judge import OpenAIJudge, OpenAIJudgeConfig
from .parse import ScoreParseError, parse_scores, try_parse_scores
from .pipeline import ScoringSummary, load_answers_dir, score_requests, write_model_outputs
from .report import EvalReport, build_report, render_markdown, write_report
from .store import ResultsStore, StoreAudit, load_results
from .template import JudgeTemplate
from .template_loader import load_judge_template

__all__ = [n for n in dir() if not n.startswith("_")]
