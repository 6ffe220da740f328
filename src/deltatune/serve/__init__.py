"""``deltatune serve``: one base model, many adapters, mixed traffic batched over HTTP.

    app.py       the routes (FastAPI), the error replies, starting and stopping uvicorn
    requests.py  the request bodies and the checks every request passes before it is batched
    registry.py  the runs being served, loaded and unloaded while serving
    batcher.py   requests collected from an asyncio queue into batches (size cap, wait cap)
    worker.py    one batch on the model: forward passes of mixable rows, each request answered alone
    errors.py    the errors a client gets back, each with its HTTP status
"""
