// SPDX-License-Identifier: Apache-2.0
// Flamenco custom job type "EX-4D": every task is `ex4d run` of one portable job file (docs/farm.md).
// Install: copy this file into the Flamenco Manager's `scripts/` folder. `ex4d farm export --engine flamenco`
// writes the job files and the submission body (settings.steps) for Flamenco's REST API (POST /api/v3/jobs).
// GPU steps get the task type "ex4d-gpu", the others "ex4d": list them in each worker's `task_types`.
// Written against Flamenco 3's documented job compiler API (author.Task, author.Command "exec",
// task.addCommand, task.addDependency, job.addTask); not run on a live Flamenco Manager.

const JOB_TYPE = {
    label: "EX-4D",
    settings: [
        { key: "store", type: "string", subtype: "dir_path", required: true,
          description: "The shared EX-4D job store (stage results are reused across tasks and workers)" },
        { key: "jobs_dir", type: "string", subtype: "dir_path", required: true,
          description: "Folder of the steps' job files (written by ex4d farm export --engine flamenco)" },
        { key: "ex4d", type: "string", default: "ex4d", description: "The ex4d command on the workers" },
        { key: "steps", type: "string", required: true, visible: "hidden",
          description: "JSON list of steps: {id, gpus, after}, in order (written by ex4d farm export)" },
    ],
};

const GPU_TASK_TYPE = "ex4d-gpu";
const CPU_TASK_TYPE = "ex4d";

function compileJob(job) {
    const settings = job.settings;
    let steps;
    try {
        steps = JSON.parse(settings.steps);
    } catch (e) {
        throw `settings.steps is not JSON: ${e}`;
    }
    if (!Array.isArray(steps) || steps.length === 0) {
        throw "settings.steps must be a non-empty list";
    }
    const tasks = {};
    for (const step of steps) {
        if (!/^[A-Za-z0-9_.-]+$/.test(step.id)) {
            throw `unusable step id ${JSON.stringify(step.id)}`;
        }
        const task = author.Task(step.id, step.gpus > 0 ? GPU_TASK_TYPE : CPU_TASK_TYPE);
        task.addCommand(author.Command("exec", {
            exe: settings.ex4d || "ex4d",
            args: ["run", path.join(settings.jobs_dir, `${step.id}.json`), "--store", settings.store],
        }));
        for (const before of step.after || []) {
            if (!(before in tasks)) {
                throw `step ${step.id} depends on ${before}, which does not come before it`;
            }
            task.addDependency(tasks[before]);
        }
        tasks[step.id] = task;
        job.addTask(task);
    }
}
