"""Scripts that run outside this machine (on a phone over adb); their parsing is tested here."""
