"""The race's competitors: standalone scripts run in their own virtualenvs (not imported)."""
