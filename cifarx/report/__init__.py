"""The static report site and the headless browser that checks it."""
