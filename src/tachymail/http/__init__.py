"""The HTTP front end (listener role ``http``): the injection API, the queue admin API, the
suppression list and the destinations, as one aiohttp application per SMTP worker process,
on that worker's event loop."""
