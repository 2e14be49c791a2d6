"""Analysis: pure functions over the recorder's frame that turn statistics into verdicts.

`diagnose(frame)` runs every rule (gradscope.analysis.rules, one module each with its
thresholds), keeps one verdict per root cause (gradscope.analysis.rank) and returns them
ranked; `OnlineDiagnosis` does it incrementally while training; `render` puts a verdict in
words for the CLI and the reports.
"""

from gradscope.analysis.diagnose import diagnose, findings
from gradscope.analysis.online import OnlineDiagnosis
from gradscope.analysis.render import headline, render

__all__ = ["OnlineDiagnosis", "diagnose", "findings", "headline", "render"]
