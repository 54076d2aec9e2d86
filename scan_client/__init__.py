"""`scan_client`: the Python client of the SCAN service, typed with the API's own pydantic schemas.

    from scan_client import Client, AsyncClient, ApiError

    with Client("http://127.0.0.1:8000", api_key) as scan:
        ds = scan.upload_dataset("photos.zip", progress=lambda sent, total: print(sent, total))
        run = scan.create_run(ds.id, num_clusters=10)
        for event in scan.follow_events(run.id):   # Server-Sent Events until the run ends
            print(event.kind, event.stage, event.epoch)
        answer = scan.predict(run.id, ["cat.png"])  # or a uint8 array (N, C, H, W): sent raw

        scan.create_model("pets")                   # a name apps call instead of a run id
        scan.publish_version("pets", run.id)        # -> version 1
        scan.move_alias("pets", "production", 1)    # answers once version 1 is warm
        scan.name_cluster("pets", 1, 7, "cats")
        scan.predict_model("pets@production", ["cat.png"]).predictions[0].name   # "cats"

        job = scan.create_assignment_job(new_ds.id, "pets@production")
        job = scan.wait_for_assignment_job(job.id)
        scan.drift_report(job.id).verdict           # stable | moderate | major

Every call is described once (scan_client/_calls.py) and run by both clients. Both retry a 503
(database or broker unreachable; the API wrote nothing) after its Retry-After header, and a request
whose connection failed (any request when it never reached the server; GET, PUT, DELETE also when
a kept-alive connection was closed under it), up to `retries` times, and raise `ApiError` (with
`.status_code` and `.detail`) on any other unexpected status.
"""

from scan_client._calls import UNSET
from scan_client._common import TERMINAL, ApiError, StalledRun
from scan_client.async_client import AsyncClient
from scan_client.client import Client

__all__ = ["TERMINAL", "UNSET", "ApiError", "AsyncClient", "Client", "StalledRun"]
