class ApplicationController < ActionController::Base
  # The tests POST without a CSRF token.
  skip_forgery_protection

  # Which process answered: the tests tell generations apart by it.
  after_action { response.set_header("X-Pid", Process.pid.to_s) }
end
