"""The evaluation (paper §3.3, §4.3-4.5): answers, PM scores, the independent judge, win rates,
Elo, evasiveness, and the HTML report built from the results."""
