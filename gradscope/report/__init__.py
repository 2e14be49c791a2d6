"""Frames and verdicts -> figures -> one self-contained HTML file (figures embedded as PNG)."""

from gradscope.report.html import Section, figure_html, render_html, table_html
from gradscope.report.sweep import render_sweep_report

__all__ = ["Section", "figure_html", "render_html", "render_sweep_report", "table_html"]
