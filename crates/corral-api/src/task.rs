use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Running,
    Succeeded,
    Failed,
    /// Stopped on request before it finished.
    Cancelled,
}

/// What a task waits for; kept with the task so a restarted controller can go on following it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum TaskGoal {
    /// The VM's disk exists (and, with `start`, the VM runs) at this generation.
    VmCreate {
        generation: u64,
        start: bool,
    },
    VmStart {
        generation: u64,
    },
    VmStop {
        generation: u64,
    },
    /// The VM has been reset this many times.
    VmReboot {
        reboots: u64,
    },
    /// The VM is gone.
    VmDelete,
    /// The VM's disk is on `datastore` at this generation.
    VmMoveStorage {
        generation: u64,
        datastore: String,
    },
    /// The migration with this id finished.
    VmMigrate {
        id: Uuid,
    },
    /// No VM runs on the host any more (it entered maintenance).
    HostEvacuate {
        host: String,
    },
    ImageBuild,
}

/// A long operation (build an image, start or stop a VM) that clients follow to its end.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Task {
    pub id: Uuid,
    pub project: String,
    /// What the task does, e.g. "vm.start", "image.build-jeos".
    pub kind: String,
    /// The object it acts on, e.g. "vm/web-1".
    pub target: String,
    pub goal: TaskGoal,
    pub state: TaskState,
    /// 0 to 100.
    pub progress: u8,
    /// The current step, for people.
    pub message: String,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Task {
    pub fn new(project: &str, kind: &str, target: String, goal: TaskGoal) -> Self {
        let now = Utc::now();
        Self {
            id: Uuid::new_v4(),
            project: project.to_string(),
            kind: kind.to_string(),
            target,
            goal,
            state: TaskState::Running,
            progress: 0,
            message: "queued".into(),
            error: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// The name of the object the task acts on ("web" for "vm/web").
    pub fn target_name(&self) -> &str {
        self.target
            .split_once('/')
            .map_or(self.target.as_str(), |(_, n)| n)
    }

    pub fn is_finished(&self) -> bool {
        self.state != TaskState::Running
    }
}
