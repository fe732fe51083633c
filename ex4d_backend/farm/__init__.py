"""Many shots on a farm: portable job files dispatched by an existing engine (docs/farm.md).

``plan``        each job split into steps by the hardware its stages need (the task graph)
``runner``      one step = ``ex4d run`` of a portable job file, its progress, cancel and death
``submission``  what was submitted and each step's state, in the shared store
``ray_engine``  the steps as Ray tasks (``ex4d farm submit --engine ray``)
``openjd``      the steps as an Open Job Description template (``ex4d farm export --engine openjd``)
"""
