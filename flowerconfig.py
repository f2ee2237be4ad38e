"""Flower's settings (`celery -A workers flower` reads this file from the working directory).

The task list shows each task's keyword arguments (a batch's run, priority and cursor range)
and its result (while it runs: its progress, keys scanned and migrated so far), so a batch can
be found without opening it.
"""
tasks_columns = "name,uuid,state,kwargs,result,received,started,runtime,worker"
