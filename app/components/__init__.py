"""Widgets and cached core calls shared by the pages."""
