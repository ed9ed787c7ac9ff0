"""The published numbers (paper Tables I and II), printed beside ours so nobody has to look them up.

Keys are our method and task names; the paper's T1/T2 map to: Census-Income income/marital, Ali-CCP
purchase/click, AliExpress conversion/click. ``single-task mean`` is the mean of the paper's TM-1 and TM-2.
"""

from __future__ import annotations

_T1_T2 = {"census-income": ("income", "marital"), "ali-ccp": ("purchase", "click"),
          "aliexpress": ("conversion", "click")}

_TABLE1 = {  # method -> dataset -> (T1, T2)
    "TM-1": {"census-income": (0.93009, 0.99230), "ali-ccp": (0.60862, 0.62297), "aliexpress": (0.86524, 0.70310)},
    "TM-2": {"census-income": (0.90739, 0.99356), "ali-ccp": (0.61937, 0.62324), "aliexpress": (0.86958, 0.70880)},
    "ple": {"census-income": (0.92528, 0.99465), "ali-ccp": (0.57442, 0.57975), "aliexpress": (0.81261, 0.69853)},
    "mmoe": {"census-income": (0.94051, 0.99437), "ali-ccp": (0.58419, 0.58951), "aliexpress": (0.80499, 0.69988)},
    "aitm": {"census-income": (0.94527, 0.99436), "ali-ccp": (0.57866, 0.58389), "aliexpress": (0.78133, 0.69943)},
    "adatt": {"census-income": (0.94523, 0.99479), "ali-ccp": (0.58076, 0.60080), "aliexpress": (0.70414, 0.69111)},
    "emm": {"census-income": (0.94108, 0.99467), "ali-ccp": (0.59916, 0.61597), "aliexpress": (0.85080, 0.70571)},
}

_TABLE2 = {  # ablation -> dataset -> (T1, T2)
    "baseline": {"census-income": (0.94088, 0.99383), "ali-ccp": (0.52897, 0.61216), "aliexpress": (0.76183, 0.70159)},
    "+mtm": {"census-income": (0.93215, 0.99376), "ali-ccp": (0.54757, 0.61483), "aliexpress": (0.84987, 0.69863)},
    "+pretrained": {"census-income": (0.92647, 0.99352), "ali-ccp": (0.53139, 0.58600),
                    "aliexpress": (0.71285, 0.69965)},
    "full": {"census-income": (0.94108, 0.99467), "ali-ccp": (0.59916, 0.61597), "aliexpress": (0.85080, 0.70571)},
}


def _lookup(table: dict, method: str, dataset: str, task: str) -> float | None:
    pair = table.get(method, {}).get(dataset)
    if pair is None or task not in _T1_T2.get(dataset, ()):
        return None
    return pair[_T1_T2[dataset].index(task)]


def table1(method: str, dataset: str, task: str) -> float | None:
    """The paper's Table I AUC for our ``method`` name, or None where the paper has no such cell."""
    if method == "single-task mean":
        a, b = _lookup(_TABLE1, "TM-1", dataset, task), _lookup(_TABLE1, "TM-2", dataset, task)
        return None if a is None or b is None else (a + b) / 2
    return _lookup(_TABLE1, method, dataset, task)


def table2(ablation: str, dataset: str, task: str) -> float | None:
    return _lookup(_TABLE2, ablation, dataset, task)
