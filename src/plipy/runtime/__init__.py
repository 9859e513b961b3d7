"""The runtime every experiment runs on: the protocol (`experiment`), the driver (`driver.execute`), the checkpoint
of finished units (`checkpoint`) and the provenance of results (`provenance`)."""
