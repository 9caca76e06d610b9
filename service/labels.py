"""Labels of job results and the filter grammar of listings and range exports (issue 15).

Labels (``PUT /v1/job-results/{job_id}``, field ``labels``): an object of at most :data:`MAX_LABELS`
string keys to string values.

* A key follows :data:`LABEL_KEY_RULE`: 1-63 characters from ``a-z 0-9 . _ / -``, starting with a letter.
* A value follows :data:`LABEL_VALUE_RULE`: 0-255 characters (Unicode code points) without control
  characters. Control characters are Unicode general category ``Cc`` (U+0000-U+001F, U+007F-U+009F)
  plus the line and paragraph separators U+2028 and U+2029, which break lines as well. Format
  characters (``Cf``, e.g. the zero-width joiner inside emoji sequences) are allowed.

Filters (``GET /v1/job-results`` query parameters, ``POST /v1/exports`` body fields, same names):

* ``label=key:value``: the job has label ``key`` with this value; split at the first ``:`` (keys never
  hold one, values may). Several values of one key are ORed; different keys are ANDed.
* ``label=key``: the job has label ``key``, whatever its value (it absorbs ``key:value`` terms of the
  same key).
* ``status`` (repeatable, ORed) and ``job_id_prefix`` (job ids starting with it).

Bounds: at most :data:`MAX_FILTER_KEYS` label keys and :data:`MAX_FILTER_TERMS` label terms in total.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from repositories.domain import InvalidParameter
from repositories.job_results import LabelTerm, ResultFilter

MAX_LABELS = 32
"""Labels one job result may carry."""
MAX_FILTER_KEYS = 8
"""Different label keys one filter may name."""
MAX_FILTER_TERMS = 32
"""``label`` terms (values and exists-terms, after removing duplicates) one filter may hold."""
MAX_VALUE_CHARS = 255
LABEL_KEY_RULE = "a label key is 1 to 63 characters from a-z 0-9 . _ / - and starts with a letter"
LABEL_VALUE_RULE = "a label value is 0 to 255 characters without control characters (Unicode Cc, U+2028, U+2029)"
LABEL_KEY_PATTERN = re.compile(r"[a-z][a-z0-9._/-]{0,62}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
JOB_ID_PREFIX_RULE = "job_id_prefix is 1 to 128 characters from A-Z a-z 0-9 . _ : - (the start of a job id)"
_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def label_problem(key: str, value: str) -> str | None:
    """Why the label ``key: value`` is not allowed, naming the label (never its value) and the rule; None if it is."""
    shown = repr(key if len(key) <= 80 else key[:77] + "...")
    if not LABEL_KEY_PATTERN.fullmatch(key):
        return f"label {shown}: {LABEL_KEY_RULE}"
    if len(value) > MAX_VALUE_CHARS or _CONTROL.search(value):
        return f"label {shown}: {LABEL_VALUE_RULE}"
    return None


def check_labels(labels: Mapping[str, str]) -> None:
    """Check the labels of a PUT.

    Raises:
        InvalidParameter: (400) naming the first offending label and its rule, or the count.
    """
    if len(labels) > MAX_LABELS:
        raise InvalidParameter(f"labels: at most {MAX_LABELS} labels per job result, got {len(labels)}")
    for key, value in labels.items():
        problem = label_problem(key, value)
        if problem is not None:
            raise InvalidParameter(problem)


def parse_label_terms(terms: Iterable[str], name: str = "label") -> tuple[LabelTerm, ...]:
    """``key:value`` / ``key`` terms as :class:`LabelTerm` per key, keys in first-seen order.

    Raises:
        InvalidParameter: (400) naming the term and the rule, or the bound it passes.
    """
    values: dict[str, list[str] | None] = {}  # None: the key must exist, any value
    for term in terms:
        key, colon, value = term.partition(":")
        shown = repr(term if len(term) <= 80 else term[:77] + "...")  # a 255-character value is not echoed whole
        if not LABEL_KEY_PATTERN.fullmatch(key):
            raise InvalidParameter(f"{name} {shown}: expected key:value or key; {LABEL_KEY_RULE}", name)
        if colon and (problem := label_problem(key, value)) is not None:
            raise InvalidParameter(f"{name} {shown}: {problem}", name)
        known = values.get(key, [])
        if key not in values:
            if len(values) == MAX_FILTER_KEYS:
                raise InvalidParameter(f"{name}: at most {MAX_FILTER_KEYS} different label keys", name)
            values[key] = known
        if not colon:
            values[key] = None
        elif known is not None and value not in known:
            known.append(value)
        if sum(1 if vals is None else len(vals) for vals in values.values()) > MAX_FILTER_TERMS:
            raise InvalidParameter(f"{name}: at most {MAX_FILTER_TERMS} label terms in total", name)
    return tuple(LabelTerm(key, tuple(vals or ())) for key, vals in values.items())


def build_filter(
    label: Iterable[str] | None, status: Iterable[str] | None, job_id_prefix: str | None, name: str = "label"
) -> ResultFilter:
    """The :class:`ResultFilter` of checked filter parameters (statuses are checked by their type).

    Raises:
        InvalidParameter: (400) a label term or the prefix breaks its rule, or a bound is passed.
    """
    if job_id_prefix is not None and not _PREFIX_PATTERN.fullmatch(job_id_prefix):
        raise InvalidParameter(JOB_ID_PREFIX_RULE, "job_id_prefix")
    return ResultFilter(
        statuses=tuple(dict.fromkeys(status or ())),
        labels=parse_label_terms(label or (), name),
        job_id_prefix=job_id_prefix,
    )
