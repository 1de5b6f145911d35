"""Figures and the HTML report for attrib."""
